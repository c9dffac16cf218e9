"""import-interactions and the leave-one-out benchmark: split, negatives, exact sampled metrics, CSV rejects."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streamrank.cli import main
from streamrank.context import Context
from streamrank.errors import MissingInputError, UsageError
from streamrank.loo import (
    FIRST_ID,
    LooSplit,
    example_rows,
    import_interactions,
    loo_metrics,
    loo_split,
    parse_timestamps,
    sample_negatives,
    write_rows,
)

H = 3_600_000_000  # one hour in microseconds


def tiny() -> tuple[list[str], list[str], list[int], list[int]]:
    """u1: a(1h) b(2h) c(3h) d(4h); u2: two rows only (skipped); u3: x, then a and b at the same
    instant (file order decides: a first), then c. Items a b c d x -> ids 2 3 4 5 6."""
    rows = [
        ("u1", "c", 3), ("u1", "a", 1), ("u2", "a", 1), ("u1", "d", 4), ("u1", "b", 2),
        ("u3", "x", 1), ("u2", "b", 2), ("u3", "a", 5), ("u3", "b", 5), ("u3", "c", 6),
    ]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] * H for r in rows], list(range(len(rows)))


def test_loo_split_exact():
    split = loo_split(*tiny())
    assert split.users == ["u1", "u3"] and split.skipped_users == 1
    assert split.items == {"a": 2, "b": 3, "c": 4, "d": 5, "x": 6}
    assert [t.tolist() for t in split.train] == [[2, 3], [6, 2]]  # u1: a b | u3: x a (a before b: file order)
    assert split.valid.tolist() == [4, 3]  # u1: c, u3: b
    assert split.test.tolist() == [5, 4]  # u1: d, u3: c
    assert split.times[0].tolist() == [H, 2 * H, 3 * H, 4 * H]


def test_negatives_never_interacted_unique_and_seeded():
    users = [f"u{u}" for u in range(20) for _ in range(5)]
    items = [f"i{(u * 7 + j) % 50:02d}" for u in range(20) for j in range(5)]
    split = loo_split(users, items, list(range(100)))
    a = sample_negatives(split, 10, np.random.default_rng(1))
    b = sample_negatives(split, 10, np.random.default_rng(1))
    c = sample_negatives(split, 10, np.random.default_rng(2))
    assert (a == b).all() and not (a == c).all()
    for u in range(len(split.users)):
        seen = set(split.train[u].tolist()) | {int(split.valid[u]), int(split.test[u])}
        assert len(set(a[u].tolist())) == 10 and not seen & set(a[u].tolist())
        assert a[u].min() >= FIRST_ID and a[u].max() < split.n_ids
    # a user who touched all but 2 items gets exactly those 2, padded with 0
    full = loo_split(["u"] * 5 + ["v"] * 3, ["a", "b", "c", "d", "e", "a", "b", "c"], list(range(8)))
    neg = sample_negatives(full, 4, np.random.default_rng(0))
    assert sorted(neg[1].tolist()) == [0, 0, 5, 6]  # v never touched d (5) and e (6)


def test_sampled_and_full_metrics_exact():
    """Scorer prefers lower ids (score = -id); ranks are known by hand.

    u1: test d (5), negatives [2, 6, 9, 10] -> one lower id (2) beats it: rank 1.
    u3: test c (4), negatives [2, 3, 5, 7] -> 2 and 3 beat it: rank 2.
    Full ranking (ids 2..10, minus test and history): u1 history {2,3,4} -> competitors
    6..10, none lower than 5: rank 0; u3 history {6,2,3} -> competitors 5,7,8,9,10: rank 0.
    """
    base = loo_split(*tiny())
    split = LooSplit(base.users, base.train, base.valid, base.test, base.times,
                     {**base.items, "y": 7, "z": 8, "w": 9, "v": 10}, 0)
    negatives = np.array([[2, 6, 9, 10], [2, 3, 5, 7]])
    score = lambda batch, ids: -ids.astype(float)  # noqa: E731
    got = loo_metrics(split, negatives, score, k=2, seq_len=4)
    assert got["ndcg@2"] == pytest.approx((1 / math.log2(3) + 0.0) / 2)  # rank 1 -> 1/log2(3); rank 2 misses k=2
    assert got["hr@2"] == pytest.approx(0.5)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert got["ndcg@2_full"] == pytest.approx(1.0) and got["hr@2_full"] == pytest.approx(1.0)
    # ties count against the test item: a constant scorer ranks it last among the 4 negatives
    flat = loo_metrics(split, negatives, lambda b, ids: np.zeros(ids.shape), k=10, seq_len=4)
    assert flat["mrr"] == pytest.approx(1 / 5)


def test_example_rows_have_the_training_layout(tmp_path):
    split = loo_split(*tiny())
    neg = np.array([[6, 7, 8], [4, 5, 7]])
    rows = example_rows(split, neg, seq_len=4)
    by = {(r["viewer_id"], r["split"]): r for r in rows}
    tr, va = by[("u1", "train")], by[("u1", "valid")]
    assert tr["hist_product"] == [0, 0, 0, 2] and tr["target_product"] == 3 and tr["cand_products"] == [0, 0, 0]
    assert tr["hist_dt"] == [0.0, 0.0, 0.0, pytest.approx(1.0)]  # a was 1 h before b
    assert va["hist_product"] == [0, 0, 2, 3] and va["target_product"] == 4 and va["cand_products"] == [6, 7, 8]
    assert va["hist_len"] == 2 and va["hist_event"] == [0, 0, 2, 2] and va["label_purchase"] == 0
    files = write_rows(rows, tmp_path / "ex")
    import pyarrow.parquet as pq

    from streamrank.delta import arrow_schema
    from streamrank.schemas import table_spec

    got = pq.read_table(files[0].removeprefix("file://"))
    want = arrow_schema(table_spec("gold/training_examples").schema)
    assert got.num_rows == 4
    norm = lambda t: str(t).replace("element:", "item:")  # noqa: E731 - Parquet names list children "element"
    assert [(f.name, norm(f.type)) for f in got.schema] == [(f.name, norm(f.type)) for f in want if f.name != "as_of_date"]


def test_parse_timestamps_units_and_failures():
    us, ok = parse_timestamps(["1700000000", "1700000000000", "2023-11-14T22:13:20Z", "2023-11-14 23:13:20+01:00",
                               "", None, "yesterday", "1.7e9"])
    assert ok.tolist() == [True, True, True, True, False, False, False, True]
    assert len(set(us[[0, 1, 2, 3, 7]].tolist())) == 1 and us[0] == 1_700_000_000_000_000


def write_csv(path: Path, rows: list[list[str]], header: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_import_reports_bad_rows_exactly(spark, conf, tmp_path, capsys):
    ctx = Context(conf)
    rows = [
        ["u1", "a", "1700000000", "view"],          # line 2 ok
        ["", "b", "1700000001", "view"],            # line 3 missing user
        ["u2", "", "1700000002", "view"],           # line 4 missing item
        ["u2", "b", "not a time", "view"],          # line 5 bad ts
        ["u3", "c", "", "view"],                    # line 6 bad ts (empty)
        ["u3", "d", "2023-11-14T22:13:20Z", ""],    # line 7 ok (ISO, no event)
        ["u4", "e", "1700000000000", "cart", "x"],  # line 8 malformed (5 fields)
        ["  ", "f", "1700000003", "view"],          # line 9 missing user (blank)
        ["u5", "g", "1700000004", "buy"],           # line 10 ok
    ]
    src = write_csv(tmp_path / "log.csv", rows, ["user", "item", "ts", "ev"])
    res = import_interactions(ctx, src, "tiny", "user", "item", "ts", "ev")
    assert res.rows_read == 9 and res.rows_imported == 3 and res.rows_rejected == 6
    assert res.rejected == {"malformed_row": 1, "missing_user": 2, "missing_item": 1, "bad_ts": 2}
    out = capsys.readouterr().out
    assert "9 rows read, 3 imported, 6 rejected (malformed_row=1 missing_user=2 missing_item=1 bad_ts=2)" in out
    with open(res.reject_file) as fh:
        rejects = list(csv.DictReader(fh))
    assert [(int(r["line_number"]), r["reason"]) for r in rejects] == [
        (3, "missing_user"), (4, "missing_item"), (5, "bad_ts"), (6, "bad_ts"), (8, "malformed_row"), (9, "missing_user")]
    table = ctx.table("datasets/interactions").to_arrow()
    got = sorted(zip(table.column("user_id").to_pylist(), table.column("line_number").to_pylist(),
                     table.column("event").to_pylist(), strict=True))
    assert got == [("u1", 2, "view"), ("u3", 7, None), ("u5", 10, "buy")]
    assert table.column("ts").to_pylist()[0].tzinfo is not None
    # re-import replaces the partition; a clean file removes the old reject file
    clean = write_csv(tmp_path / "clean.csv", [["u1", "a", "1700000000", "v"]], ["user", "item", "ts", "ev"])
    res2 = import_interactions(ctx, clean, "tiny", "user", "item", "ts", "ev")
    assert res2.rows_rejected == 0 and res2.reject_file is None and not Path(res.reject_file).exists()
    assert ctx.table("datasets/interactions").to_arrow().num_rows == 1
    with pytest.raises(UsageError, match="no column --ts-col 'time'"):
        import_interactions(ctx, clean, "tiny", "user", "item", "time")
    with pytest.raises(MissingInputError):
        import_interactions(ctx, tmp_path / "nope.csv", "tiny")


def test_benchmark_loo_cli_prints_one_json_line(spark, conf, tmp_path, capsys):
    """A learnable log (each user walks the catalogue in steps of 1 from a random start) through
    the CLI: import, then benchmark with a tiny model; one JSON line with the agreed keys."""
    rng = np.random.default_rng(0)
    rows = []
    t0 = int(dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp())
    for u in range(60):
        start = int(rng.integers(0, 30))
        for j in range(8):
            rows.append([f"user{u}", f"item{(start + j) % 30:02d}", str(t0 + u * 1000 + j * 60)])
    src = write_csv(tmp_path / "walk.csv", rows, ["uid", "iid", "t"])
    base = ["--conf", str(Path(__file__).resolve().parents[2] / "conf" / "local.yaml"),
            "--set", f"warehouse.root={conf.warehouse}", "--set", "spark.master=local[2]",
            "--set", "spark.shuffle_partitions=2"]
    assert main(["import-interactions", *base, "--input", str(src), "--dataset", "walk",
                 "--user-col", "uid", "--item-col", "iid", "--ts-col", "t"]) == 0
    capsys.readouterr()
    small = ["--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.num_negatives=20",
             "--set", "features.seq_len=8", "--set", "train.batch_size=32"]
    assert main(["benchmark-loo", *base, *small, "--dataset", "walk", "--negatives", "20", "--epochs", "3",
                 "--patience", "3", "--device", "cpu", "--seed", "3"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    got = json.loads(lines[0])
    for key in ("dataset", "users", "items", "epochs", "ndcg@10", "hr@10", "ndcg@10_full", "seconds"):
        assert key in got
    assert got["dataset"] == "walk" and got["users"] == 60 and got["items"] == 30 and 1 <= got["epochs"] <= 3
    assert 0.0 <= got["ndcg@10"] <= got["hr@10"] <= 1.0 and 0.0 <= got["ndcg@10_full"] <= 1.0
    assert (conf.reports / "benchmark_loo_walk.json").exists()
    assert main(["benchmark-loo", *base, "--dataset", "missing"]) == 5


def test_loo_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        loo_split(["u"], ["a", "b"], [1, 2])
    assert pa is not None
