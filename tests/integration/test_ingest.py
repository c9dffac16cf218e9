"""Ingest: exact counts against the generator's ledger, exact line numbers, parse flags,
snapshots of D and D+1, exactly-once across re-runs, late files, changed files and
crashes at every point, and the exit codes of bad or missing input."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamrank import cli
from streamrank.context import Context
from streamrank.delta import InjectedFault
from streamrank.generate import generate
from streamrank.ingest import FAULT_AFTER_BRONZE_ENV, ChangedFileError, ingest

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
SCALE = 0.005
BRONZE = ["bronze/viewer_events", "bronze/products", "bronze/streams", "bronze/stream_products"]
TABLES = BRONZE + ["ops/ingest_log"]
EVENT_FIELDS = ["event_id", "viewer_id", "session_id", "stream_id", "host_id", "product_id", "event_type", "event_ts",
                "dwell_ms", "price_paid", "quantity", "device_id", "ip", "comment_text", "app_version"]


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    """Two generated days with every fault kind (plus the schedule of D3), built once."""
    root = tmp_path_factory.mktemp("generated") / "landing"
    ledger = generate(root, D1, 2, scale=SCALE, faults=True)
    return root, ledger


@pytest.fixture()
def landing(generated, tmp_path) -> Path:
    """A private copy of the generated landing root, free to be modified by the test."""
    dst = tmp_path / "landing"
    shutil.copytree(generated[0], dst, ignore=shutil.ignore_patterns("state"))
    return dst


@pytest.fixture()
def ledger(generated) -> dict:
    return generated[1]["dates"]


def make_ctx(spark, base_conf, tmp_path: Path, landing: Path) -> Context:
    """A Context on `tmp_path`/warehouse and `landing`, sharing the test session's Spark."""
    ctx = Context(base_conf.with_overrides({"warehouse.root": str(tmp_path / "warehouse"), "landing.root": str(landing)}))
    ctx.spark = spark
    return ctx


def versions(ctx: Context) -> dict[str, int | None]:
    return {name: ctx.table(name).version() for name in TABLES}


def events_of(ctx: Context, date: dt.date | None = None) -> list[dict]:
    rows = ctx.table("bronze/viewer_events").to_arrow().to_pylist()
    return [r for r in rows if date is None or r["ingest_date"] == date]


def log_of(ctx: Context) -> list[dict]:
    return ctx.table("ops/ingest_log").to_arrow().to_pylist()


def per_file(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["source_file"]] = out.get(r["source_file"], 0) + 1
    return out


def ledger_files(ledger: dict, date: dt.date) -> dict[str, int]:
    return {f["path"]: f["lines"] for f in ledger[date.isoformat()]["files"]}


def file_lines(path: Path) -> dict[int, bytes]:
    """Python's count: line = bytes up to \\n, one trailing \\r dropped, empty lines skipped."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    out = {}
    for i, line in enumerate(data.split(b"\n"), 1):
        line = line[:-1] if line.endswith(b"\r") else line
        if line:
            out[i] = line
    return out


def strict_object(line: bytes) -> dict | None:
    try:
        obj = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def assert_exact(ctx: Context, ledger: dict, date: dt.date) -> None:
    """Bronze rows of `date` == ledger lines, per file and in total; the log agrees; no duplicates."""
    rows = events_of(ctx, date)
    expected = {p: n for p, n in ledger_files(ledger, date).items() if n}
    assert len(rows) == ledger[date.isoformat()]["lines"]
    assert per_file(rows) == expected
    assert len({(r["source_file"], r["line_number"]) for r in rows}) == len(rows)
    logged = {r["path"]: r["rows"] for r in log_of(ctx) if r["kind"] == "events" and r["ingest_date"] == date}
    assert logged == expected


def cli_ingest(date: dt.date, warehouse: Path, landing: Path) -> int:
    return cli.main(["ingest", "--date", date.isoformat(), "--set", f"warehouse.root={warehouse}",
                     "--set", f"landing.root={landing}"])


def write_csvs(landing: Path, date: dt.date) -> None:
    """Minimal valid catalog and schedule files of a date, for hand-written landings."""
    d = date.isoformat()
    (landing / "catalog").mkdir(parents=True, exist_ok=True)
    (landing / "schedule").mkdir(parents=True, exist_ok=True)
    (landing / "catalog" / f"products_{d}.csv").write_text(
        "product_id,title,category,brand,list_price,launch_date\n"
        'p1,"Lamp, ""Nordic""",home_decor,Ora,30.50,2026-01-02\r\n'
        "p2,Tea,beverages,Mio,5,2026-02-03\n")
    (landing / "schedule" / f"streams_{d}.csv").write_text(
        f"stream_id,host_id,start_ts,end_ts\ns1,h1,{d}T10:00:00Z,{d}T11:00:00Z\n")
    (landing / "schedule" / f"stream_products_{d}.csv").write_text(
        f"stream_id,product_id,slot_start_ts,slot_end_ts,live_price\ns1,p1,{d}T10:00:00Z,{d}T10:30:00Z,25.00\n")


# ----------------------------------------------------------------------------- the happy path

def test_exact_counts_line_numbers_parse_flags_and_snapshots(spark, base_conf, tmp_path, landing, ledger):
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    summary = ingest(ctx, D1)
    day = ledger[D1.isoformat()]
    assert summary["rows"]["bronze/viewer_events"] == day["lines"]
    assert summary["files_empty"] == day["empty_files"] >= 1
    assert_exact(ctx, ledger, D1)

    rows = events_of(ctx, D1)
    got = {(r["source_file"], r["line_number"]): r for r in rows}
    expected: dict[tuple[str, int], bytes] = {}
    for rel, n in ledger_files(ledger, D1).items():
        lines = file_lines(landing / rel)
        assert len(lines) == n
        expected.update({(rel, i): line for i, line in lines.items()})
    # every line at exactly its position in its file, gzip and plain, with its raw text
    assert set(got) == set(expected)
    assert any(rel.endswith(".gz") for rel, _ in got)
    for key, line in expected.items():
        assert got[key]["raw_line"] == line.decode("utf-8", "replace"), key
    # parse_ok is false exactly for the lines that are not a JSON object
    bad = {key for key, line in expected.items() if strict_object(line) is None}
    assert {key for key, r in got.items() if not r["parse_ok"]} == bad
    assert len(bad) == day["faults"]["malformed_json"]
    for key in bad:
        assert all(got[key][f] is None for f in EVENT_FIELDS) and got[key]["raw_line"]
    # fields as their JSON text: ints, strings, wrong types ("abc"), nulls; floats the same number
    for key, line in expected.items():
        obj = strict_object(line)
        if obj is None:
            continue
        for f in EVENT_FIELDS:
            value, text = obj.get(f), got[key][f]
            if value is None or isinstance(value, str):
                assert text == value, (key, f)
            elif isinstance(value, bool):
                assert text == str(value).lower()
            elif isinstance(value, int):
                assert text == str(value), (key, f)
            else:
                assert float(text) == value
    def numeric(text: str | None) -> bool:
        try:
            return text is None or float(text) == float(text)
        except ValueError:
            return False

    wrong = [r for r in rows if r["parse_ok"] and not all(numeric(r[f]) for f in ("dwell_ms", "quantity", "price_paid"))]
    assert len(wrong) == day["faults"]["wrong_type"]  # a value of the wrong JSON type is kept as its text
    # invalid UTF-8 bytes: decoded with replacement characters, the line still parses
    replaced = [r for r in rows if r["comment_text"] and "\ufffd" in r["comment_text"]]
    assert len(replaced) == day["faults"]["non_utf8"] and all(r["parse_ok"] for r in replaced)
    assert {r["ingest_run_id"] for r in rows} == {ctx.run_id} and {r["ingest_date"] for r in rows} == {D1}
    assert all(r["ingested_at"] is not None for r in rows)

    # ingest_log: one row per file with data, sha256 of the bytes, rows, table and version
    log = {r["path"]: r for r in log_of(ctx)}
    for rel, n in ledger_files(ledger, D1).items():
        if n == 0:
            assert rel not in log  # zero-byte files are skipped, not logged
            continue
        data = (landing / rel).read_bytes()
        assert log[rel]["checksum"] == hashlib.sha256(data).hexdigest() and log[rel]["size"] == len(data)
        assert log[rel]["target_table"] == "bronze/viewer_events" and log[rel]["table_version"] == 1

    # snapshots: catalog and schedule of D, and the schedule of D+1, typed, with line numbers
    def csv_rows(rel: str) -> int:
        return len((landing / rel).read_text().strip().splitlines()) - 1

    products = ctx.table("bronze/products").to_arrow().to_pylist()
    assert {r["snapshot_date"] for r in products} == {D1}  # the catalog of D+1 waits for its own run
    assert len(products) == csv_rows(f"catalog/products_{D1}.csv") == log[f"catalog/products_{D1}.csv"]["rows"]
    assert isinstance(products[0]["list_price"], float) and isinstance(products[0]["launch_date"], dt.date)
    for table, name in (("bronze/streams", "streams"), ("bronze/stream_products", "stream_products")):
        snap = ctx.table(table).to_arrow().to_pylist()
        for d in (D1, D2):
            part = [r for r in snap if r["snapshot_date"] == d]
            assert len(part) == csv_rows(f"schedule/{name}_{d}.csv") > 0
            assert {r["source_file"] for r in part} == {f"schedule/{name}_{d}.csv"}
            assert sorted(r["line_number"] for r in part) == list(range(2, len(part) + 2))
        assert {r["snapshot_date"] for r in snap} == {D1, D2}
    streams = ctx.table("bronze/streams").to_arrow().to_pylist()
    assert all(isinstance(r["start_ts"], dt.datetime) and r["start_ts"] < r["end_ts"] for r in streams)

    # ops/job_runs: a success row with the versions written
    runs = [r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "ingest"]
    assert [(r["status"], r["exit_code"], r["run_date"]) for r in runs] == [("success", 0, D1)]
    assert json.loads(runs[0]["versions_written"])["bronze/viewer_events"] == 1

    # re-running adds nothing: no table gets a new version
    before = versions(ctx)
    again = ingest(ctx, D1)
    assert again["files_new"] == 0 and again["files_skipped"] == len(log)
    assert versions(ctx) == before
    assert len(events_of(ctx)) == day["lines"]


def test_edge_cases_of_hand_written_lines(spark, base_conf, tmp_path):
    """CRLF, blank lines, trailing text, non-objects, single quotes, invalid UTF-8, floats."""
    landing = tmp_path / "landing"
    folder = landing / "events" / f"date={D1}"
    folder.mkdir(parents=True)
    lines = [
        b'{"event_id":"e1","dwell_ms":1200,"price_paid":15.10,"quantity":"abc","comment_text":"a\\nb"}\r',  # 1 CRLF
        b"",  # 2 blank: no row, still counted
        b'{"event_id":"e3","viewer_id":{"x":[1,2]},"quantity":true,"ip":null}',  # 3
        b'{"event_id":"e4","viewer_id":"v',  # 4 cut
        b'{"event_id":"e5"} trailing',  # 5 trailing text
        b"[1,2]",  # 6 not an object
        b"42",  # 7
        b"{'event_id':'e8'}",  # 8 single quotes
        b'{"event_id":"e9","comment_text":"bad \xff\xfe bytes"}',  # 9 invalid UTF-8
        b"   ",  # 10 whitespace: a row that does not parse
        b"{}",  # 11 an empty object parses
        b'{"event_id":"e12"}',  # 12 no trailing newline
    ]
    (folder / "a.jsonl").write_bytes(b"\n".join(lines))
    with gzip.open(folder / "b.jsonl.gz", "wb") as fh:
        fh.write(b'\n{"event_id":"g2"}\n\n{"event_id":"g4"}\n')
    (folder / "c.jsonl").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    write_csvs(landing, D1)
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    before = {k: spark.conf.get(k, None) for k in ("spark.sql.files.maxPartitionBytes", "parquet.enable.dictionary#raw_line")}
    summary = ingest(ctx, D1)
    assert {k: spark.conf.get(k, None) for k in before} == before  # the read/write settings are restored
    assert summary["files_empty"] == 1 and summary["files_ignored"] == 1
    rows = {(r["source_file"].rsplit("/", 1)[1], r["line_number"]): r for r in events_of(ctx)}
    assert sorted(n for f, n in rows if f == "a.jsonl") == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert sorted(n for f, n in rows if f == "b.jsonl.gz") == [2, 4]
    ok = {n for (f, n), r in rows.items() if f == "a.jsonl" and r["parse_ok"]}
    assert ok == {1, 3, 9, 11, 12}
    first = rows[("a.jsonl", 1)]
    assert first["raw_line"].endswith("}")  # the CR of CRLF is not part of the line
    assert (first["dwell_ms"], first["price_paid"], first["quantity"], first["comment_text"]) == ("1200", "15.1", "abc", "a\nb")
    third = rows[("a.jsonl", 3)]
    assert (third["viewer_id"], third["quantity"], third["ip"]) == ('{"x":[1,2]}', "true", None)
    assert rows[("a.jsonl", 4)]["raw_line"] == '{"event_id":"e4","viewer_id":"v' and rows[("a.jsonl", 4)]["event_id"] is None
    assert rows[("a.jsonl", 5)]["event_id"] is None  # trailing text: not parsed, not half-parsed
    assert rows[("a.jsonl", 9)]["comment_text"] == "bad \ufffd\ufffd bytes"
    assert rows[("a.jsonl", 9)]["raw_line"] == '{"event_id":"e9","comment_text":"bad \ufffd\ufffd bytes"}'
    assert rows[("a.jsonl", 10)]["parse_ok"] is False and rows[("a.jsonl", 10)]["raw_line"] == "   "
    products = sorted(ctx.table("bronze/products").to_arrow().to_pylist(), key=lambda r: r["line_number"])
    assert [(p["title"], p["list_price"], p["line_number"]) for p in products] == [('Lamp, "Nordic"', 30.5, 2), ("Tea", 5.0, 3)]


# ----------------------------------------------------------------------------- late and changed files

def test_late_file_is_picked_up_once_and_a_changed_file_is_refused(spark, base_conf, tmp_path, landing, ledger):
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    ingest(ctx, D1)
    late = landing / "events" / f"date={D1}" / "part-00009.jsonl"
    late.write_bytes(b'{"event_id":"late1"}\n\n{"event_id":"late3"}\n')
    summary = ingest(ctx, D1)  # a re-run of D picks up the late file, and only it
    assert summary["new_files"] == [f"events/date={D1}/part-00009.jsonl"]
    rows = events_of(ctx, D1)
    assert len(rows) == ledger[D1.isoformat()]["lines"] + 2
    assert sorted((r["event_id"], r["line_number"]) for r in rows if r["source_file"].endswith("part-00009.jsonl")) == [
        ("late1", 1), ("late3", 3)]

    # the run for D+1 ingests D+1 exactly and sweeps D's folder for files that came late
    ingest(ctx, D2)
    assert_exact(ctx, ledger, D2)
    later = landing / "events" / f"date={D1}" / "part-00010.jsonl.gz"
    later.write_bytes(gzip.compress(b'{"event_id":"later1"}\n'))
    summary = ingest(ctx, D2)
    assert summary["new_files"] == [f"events/date={D1}/part-00010.jsonl.gz"]
    swept = [r for r in events_of(ctx) if r["source_file"].endswith("part-00010.jsonl.gz")]
    assert [(r["event_id"], r["ingest_date"]) for r in swept] == [("later1", D2)]
    assert len(events_of(ctx)) == ledger[D1.isoformat()]["lines"] + ledger[D2.isoformat()]["lines"] + 3

    # a file changed after it was ingested: an error naming it, nothing committed
    before = versions(ctx)
    changed = landing / "events" / f"date={D2}" / "part-00000.jsonl"
    changed.write_bytes(changed.read_bytes() + b'{"event_id":"sneaky"}\n')
    with pytest.raises(ChangedFileError, match=f"events/date={D2}/part-00000.jsonl"):
        ingest(ctx, D2)
    assert versions(ctx) == before
    assert cli_ingest(D2, tmp_path / "warehouse", landing) == 1


# ----------------------------------------------------------------------------- crashes

def test_crash_before_a_bronze_commit_then_rerun_is_exact(spark, base_conf, tmp_path, landing, ledger, monkeypatch):
    """A failure between writing Parquet and committing, in the events or in a snapshot table.

    The snapshot tables are written in threads beside the events, so which of the others
    committed before the failure varies; the re-run must be exact either way.
    """
    schedule = sorted(f"schedule/{k}_{d}.csv" for k in ("streams", "stream_products") for d in (D1, D2))
    for failing, warehouse in (("bronze/viewer_events", "wh-events"), ("bronze/streams", "wh-streams")):
        ctx = make_ctx(spark, base_conf, tmp_path / warehouse, landing)
        monkeypatch.setenv("STREAMRANK_FAULT_BEFORE_COMMIT", f"{failing}:raise")
        with pytest.raises(InjectedFault):
            ingest(ctx, D1)
        monkeypatch.delenv("STREAMRANK_FAULT_BEFORE_COMMIT")
        assert ctx.table(failing).version() == 0 and ctx.table("ops/ingest_log").version() == 0
        assert [r["status"] for r in ctx.table("ops/job_runs").to_arrow().to_pylist()] == ["failed"]
        committed = {t for t in BRONZE if ctx.table(t).version() == 1}

        summary = ingest(ctx, D1)
        assert summary["files_repaired"] + summary["files_new"] == 9
        assert summary["files_repaired"] == sum(4 if t == "bronze/viewer_events" else 1 if t == "bronze/products" else 2
                                                for t in committed)
        if failing == "bronze/streams":
            assert {f"schedule/streams_{d}.csv" for d in (D1, D2)} <= set(summary["new_files"])
            assert set(summary["new_files"]) <= {f"schedule/streams_{d}.csv" for d in (D1, D2)} | set(schedule)
        assert all(ctx.table(t).version() == 1 for t in BRONZE)  # each table written exactly once
        assert_exact(ctx, ledger, D1)
        log = log_of(ctx)
        assert len(log) == len({r["path"] for r in log}) == 9


def test_crash_after_bronze_commit_before_log_then_rerun_repairs(spark, base_conf, tmp_path, landing, ledger, monkeypatch):
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    monkeypatch.setenv(FAULT_AFTER_BRONZE_ENV, "raise")
    with pytest.raises(InjectedFault):
        ingest(ctx, D1)
    committed = versions(ctx)
    assert all(committed[t] == 1 for t in BRONZE) and committed["ops/ingest_log"] == 0
    monkeypatch.delenv(FAULT_AFTER_BRONZE_ENV)

    rerun = make_ctx(spark, base_conf, tmp_path, landing)
    assert rerun.run_id != ctx.run_id
    summary = ingest(rerun, D1)
    assert summary["files_new"] == 0 and summary["files_repaired"] == 4 + 5
    assert {t: v for t, v in versions(rerun).items() if t in BRONZE} == {t: 1 for t in BRONZE}
    assert_exact(rerun, ledger, D1)
    log = log_of(rerun)
    assert {r["ingest_run_id"] for r in log} == {ctx.run_id}  # credited to the run that committed
    assert {r["table_version"] for r in log} == {1} and all(r["checksum"] for r in log)
    assert ingest(rerun, D1)["files_new"] == 0 and versions(rerun)["ops/ingest_log"] == 1


def rival_inside(monkeypatch, name: str, spark, base_conf, tmp_path, landing) -> dict:
    """Patch ingest's `name` so that its first call first runs a whole rival ingest of D1 on
    the same warehouse: two runs at once, interleaved at that point. Returns the rival's
    ctx and summary once it has run."""
    import streamrank.ingest as ingest_module

    original, rival = getattr(ingest_module, name), {}

    def first_the_rival(*args, **kwargs):
        if not rival:
            rival["ctx"] = make_ctx(spark, base_conf, tmp_path, landing)
            rival["summary"] = ingest(rival["ctx"], D1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ingest_module, name, first_the_rival)
    return rival


def test_two_ingests_of_one_date_at_once_commit_each_file_once(spark, base_conf, tmp_path, landing, ledger, monkeypatch):
    """Two runs for one date, both deciding the same files are new (a retry started while
    the first run still writes, or a second scheduler): the one that commits second refuses
    (ConcurrentWriteError, exit 1) and bronze and ingest_log hold each line once."""
    from streamrank.errors import ConcurrentWriteError

    # the rival runs once this run has read ingest_log and bronze (reconcile), before it discovers
    rival = rival_inside(monkeypatch, "_discover", spark, base_conf, tmp_path, landing)
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    with pytest.raises(ConcurrentWriteError) as refused:
        ingest(ctx, D1)
    monkeypatch.undo()
    assert re.search(rf"events/date={D1}/part-\d+\.jsonl.*committed by ingest run {rival['ctx'].run_id}", str(refused.value))
    assert rival["summary"]["files_new"] == 9
    assert_exact(ctx, ledger, D1)
    log = log_of(ctx)
    assert len(log) == len({r["path"] for r in log}) == 9 and {r["ingest_run_id"] for r in log} == {rival["ctx"].run_id}
    assert all(ctx.table(t).version() == 1 for t in BRONZE)  # the loser committed nothing, snapshots included
    statuses = {r["run_id"]: r["status"] for r in ctx.table("ops/job_runs").to_arrow().to_pylist()}
    assert statuses == {rival["ctx"].run_id: "success", ctx.run_id: "failed"}

    rerun = make_ctx(spark, base_conf, tmp_path, landing)
    summary = ingest(rerun, D1)
    assert summary["files_new"] == summary["files_repaired"] == 0
    assert_exact(rerun, ledger, D1)


def test_two_runs_repairing_one_crash_at_once_log_each_file_once(spark, base_conf, tmp_path, landing, ledger, monkeypatch):
    """A crash after the bronze commits, then two runs at once: both find the same files
    missing from ingest_log; the log still names each file once."""
    monkeypatch.setenv(FAULT_AFTER_BRONZE_ENV, "raise")
    with pytest.raises(InjectedFault):
        ingest(make_ctx(spark, base_conf, tmp_path, landing), D1)
    monkeypatch.delenv(FAULT_AFTER_BRONZE_ENV)

    # the rival repairs the same commits while this run is counting their rows for its repair
    rival = rival_inside(monkeypatch, "_commit_rows", spark, base_conf, tmp_path, landing)
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    summary = ingest(ctx, D1)
    monkeypatch.undo()
    assert rival["summary"]["files_repaired"] == 9 and summary["files_new"] == 0
    log = log_of(ctx)
    assert len(log) == len({r["path"] for r in log}) == 9
    assert_exact(ctx, ledger, D1)
    assert all(ctx.table(t).version() == 1 for t in BRONZE)


def test_killed_after_bronze_commit_then_rerun_has_no_duplicates(spark, base_conf, tmp_path, landing, ledger):
    warehouse = tmp_path / "warehouse"
    env = {**os.environ, FAULT_AFTER_BRONZE_ENV: "kill"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamrank.cli", "ingest", "--date", D1.isoformat(), "--set", f"warehouse.root={warehouse}",
         "--set", f"landing.root={landing}", "--set", "spark.master=local[1]", "--set", "spark.driver_memory=1g",
         "--set", "spark.shuffle_partitions=1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ctx = make_ctx(spark, base_conf, tmp_path, landing)
    assert ctx.table("bronze/viewer_events").version() == 1 and ctx.table("ops/ingest_log").version() == 0
    summary = ingest(ctx, D1)
    assert summary["files_new"] == 0 and summary["files_repaired"] == 9
    assert_exact(ctx, ledger, D1)
    assert ctx.table("bronze/viewer_events").version() == 1


# ----------------------------------------------------------------------------- bad and missing input

def test_missing_date_or_only_empty_files_is_exit_5(spark, tmp_path, capsys):
    landing = tmp_path / "landing"
    write_csvs(landing, D1)
    warehouse = tmp_path / "warehouse"
    assert cli_ingest(D1, warehouse, landing) == 5
    assert f"events/date={D1}" in capsys.readouterr().err
    folder = landing / "events" / f"date={D1}"
    folder.mkdir(parents=True)
    (folder / "part-00000.jsonl").write_bytes(b"")
    assert cli_ingest(D1, warehouse, landing) == 5
    err = capsys.readouterr().err
    assert str(folder) in err and "zero-byte" in err
    (folder / "part-00001.jsonl").write_bytes(b'{"event_id":"x"}\n')
    (landing / "schedule" / f"streams_{D1}.csv").unlink()
    assert cli_ingest(D1, warehouse, landing) == 5
    assert f"streams_{D1}.csv" in capsys.readouterr().err
    write_csvs(landing, D1)
    assert cli_ingest(D1, warehouse, landing) == 0


def test_corrupt_gzip_is_exit_5_naming_the_file_and_commits_nothing(spark, base_conf, tmp_path, landing, capsys):
    target = landing / "events" / f"date={D1}" / "part-00001.jsonl.gz"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    assert cli_ingest(D1, tmp_path / "warehouse", landing) == 5
    err = capsys.readouterr().err
    assert f"events/date={D1}/part-00001.jsonl.gz" in err and "gzip" in err
    assert versions(make_ctx(spark, base_conf, tmp_path, landing)) == dict.fromkeys(TABLES, 0)


def test_corrupt_csv_is_exit_5_naming_file_and_line(spark, base_conf, tmp_path, capsys):
    landing = tmp_path / "landing"
    folder = landing / "events" / f"date={D1}"
    folder.mkdir(parents=True)
    (folder / "part-00000.jsonl").write_bytes(b'{"event_id":"x"}\n')
    write_csvs(landing, D1)
    streams = landing / "schedule" / f"streams_{D1}.csv"
    streams.write_text(streams.read_text() + "s2,h1,not-a-time,2026-11-01T12:00:00Z\n")
    warehouse = tmp_path / "warehouse"
    assert cli_ingest(D1, warehouse, landing) == 5
    err = capsys.readouterr().err
    assert f"schedule/streams_{D1}.csv" in err and "line 3: start_ts='not-a-time'" in err
    assert versions(make_ctx(spark, base_conf, tmp_path, landing)) == dict.fromkeys(TABLES, 0)

    write_csvs(landing, D1)
    products = landing / "catalog" / f"products_{D1}.csv"
    products.write_text("product_id,title,category,brand,launch_date\np1,Lamp,home_decor,Ora,2026-01-02\n")
    assert cli_ingest(D1, warehouse, landing) == 5
    err = capsys.readouterr().err
    assert f"catalog/products_{D1}.csv" in err and "list_price" in err

    write_csvs(landing, D1)
    products.write_text(products.read_text() + "p3,Pan,kitchenware,Ora,NaN,2026-01-02\np4,Cup\n")
    assert cli_ingest(D1, warehouse, landing) == 5
    err = capsys.readouterr().err
    assert "line 4: list_price='NaN'" in err and "line 5: 2 fields, the header has 6" in err
