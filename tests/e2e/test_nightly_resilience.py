"""The nightly as a scheduler runs it: kills, re-runs, concurrent runs, bad input, the report.

One small world (3 days of synthetic data with faults) is built once through the real
nightly; each test then attacks it. Kills are real SIGKILLs of a separate `streamrank`
process between its Parquet write and its Delta commit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from streamrank.clean import clean
from streamrank.context import Context
from streamrank.delta import Warehouse
from streamrank.errors import OlderNightError
from streamrank.generate import generate
from streamrank.ingest import ingest
from streamrank.nightly import nightly
from streamrank.promote import promote
from streamrank.publish import recover
from streamrank.registry import by_alias
from streamrank.schemas import all_table_names
from streamrank.train import newer_challenger, train

D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)
D4 = D3 + dt.timedelta(days=1)
CLI = [sys.executable, "-m", "streamrank.cli"]
REPO = Path(__file__).resolve().parents[2]


def settings(cfg) -> list[str]:
    return ["--set", f"warehouse.root={cfg.warehouse}", "--set", f"landing.root={cfg.landing}",
            "--set", "spark.master=local[2]", "--set", "spark.shuffle_partitions=2", "--set", "train.max_epochs=2"]


def table_rows(wh: Warehouse, name: str, drop: tuple[str, ...] = ()) -> list[tuple]:
    df = wh.table(name).read()
    cols = [c for c in df.columns if c not in drop]
    return sorted((tuple(r) for r in df.select(*cols).collect()), key=lambda t: tuple((v is None, str(v)) for v in t))


def versions(wh: Warehouse) -> dict[str, int | None]:
    return {name: wh.table(name).version() for name in all_table_names()}


@pytest.fixture(scope="module")
def world(spark, base_conf, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = base_conf.with_overrides({"warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing"),
                                    "train.max_epochs": 2, "train.progress": False})
    generate(cfg.landing, D1, 3, scale=0.01, faults=True, seed=5)
    ctx = Context(cfg)
    for day in (D1, D2, D3):
        assert nightly(ctx, day) == 0
    if by_alias(cfg, "champion") is None:  # the tiny model may not beat most-popular: promote it by hand
        promote(ctx, version=by_alias(cfg, "challenger").version, force=True, reason="e2e fixture")
        nightly(ctx, D3, from_stage="score")
    wh = ctx.warehouse
    baseline = table_rows(wh, "gold/user_product_rankings", drop=("run_id",))
    assert baseline, "the fixture night must publish rankings"
    return {"cfg": cfg, "ctx": ctx, "wh": wh, "rankings": baseline}


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=timeout)


def test_rankings_cover_tomorrow_with_lineage(world):
    wh = world["wh"]
    df = wh.table("gold/user_product_rankings").read()
    assert {r.score_date for r in df.select("score_date").distinct().collect()} == {D4}
    assert df.filter("model_version IS NULL OR run_id IS NULL OR purchase_prob < 0 OR purchase_prob > 1").count() == 0
    intent = wh.table("gold/user_intent_scores").read()
    assert intent.count() == intent.select("viewer_id").distinct().count() == df.select("viewer_id").distinct().count()


def test_rerun_of_the_night_changes_nothing(world):
    wh, ctx = world["wh"], world["ctx"]
    before = versions(wh)
    assert nightly(ctx, D3) == 0  # every stage already succeeded for D3: all skipped
    after = versions(wh)
    assert {k: v for k, v in after.items() if not k.startswith("ops/")} == {k: v for k, v in before.items() if not k.startswith("ops/")}
    # re-running the data stages by hand rewrites them to identical contents
    bronze = table_rows(wh, "bronze/viewer_events", drop=("ingest_run_id", "ingested_at"))
    silver = table_rows(wh, "silver/viewer_events", drop=("clean_run_id",))
    quarantine = table_rows(wh, "silver/quarantine", drop=("clean_run_id", "quarantined_at"))
    ingest(ctx, D3)
    clean(ctx, D3)
    assert table_rows(wh, "bronze/viewer_events", drop=("ingest_run_id", "ingested_at")) == bronze
    assert table_rows(wh, "silver/viewer_events", drop=("clean_run_id",)) == silver
    assert table_rows(wh, "silver/quarantine", drop=("clean_run_id", "quarantined_at")) == quarantine


@pytest.mark.parametrize("stage, tables", [
    ("clean", ("silver/viewer_events", "silver/quarantine")),
    ("features", ("gold/vocabularies", "gold/viewer_features", "gold/training_examples")),
    ("score", ("gold/user_product_rankings", "gold/user_intent_scores")),
])
def test_kill_9_between_commits_is_rolled_back_then_rerun(world, stage, tables):
    """Killed before its LAST commit, a stage has published its other tables; the next stage
    run puts them back (publish.py), and a re-run publishes identical tables."""
    wh, cfg = world["wh"], world["cfg"]
    before = versions(wh)
    drop = ("run_id", "clean_run_id", "ingest_run_id", "quarantined_at")
    previous = {t: table_rows(wh, t) for t in tables}
    expected = {t: table_rows(wh, t, drop=drop) for t in tables}
    last = tables[-1]
    proc = run_cli([stage, "--date", str(D3), *settings(cfg)], {"STREAMRANK_FAULT_BEFORE_COMMIT": f"{last}:kill"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    after = versions(wh)
    assert after[last] == before[last], f"{last} moved to {after[last]} although its writer was killed"
    assert all(after[t] > before[t] for t in tables[:-1]), "the earlier tables were committed before the kill"
    for name in all_table_names():  # every table readable at a committed version
        wh.table(name).read().limit(1).collect()
    lines = recover(world["ctx"])  # what every stage run does first
    assert len(lines) == 1 and "restored" in lines[0], lines
    assert {t: table_rows(wh, t) for t in tables} == previous  # every table at its previous content
    proc = run_cli([stage, "--date", str(D3), *settings(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {t: table_rows(wh, t, drop=drop) for t in tables} == expected


def test_second_concurrent_nightly_exits_2_naming_holder(world):
    cfg = world["cfg"]
    lock = cfg.warehouse / "_locks" / "nightly.lock"
    first = subprocess.Popen(CLI + ["nightly", "--date", str(D3), "--from", "report", *settings(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lock.exists(), "first nightly never took the lock"
        holder = json.loads(lock.read_text())
        second = run_cli(["nightly", "--date", str(D3), *settings(cfg)])
        assert second.returncode == 2
        assert f"pid {holder['pid']}" in second.stderr and "another nightly holds" in second.stderr
    finally:
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]


def test_stale_lock_of_killed_run_does_not_block(world):
    cfg = world["cfg"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = cfg.warehouse / "_locks" / "nightly.lock"
    lock.parent.mkdir(exist_ok=True)
    import socket

    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started_at": "2026-11-03T01:30:00+00:00"}))
    proc = run_cli(["nightly", "--date", str(D3), "--from", "report", *settings(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "took over a stale lock" in proc.stdout
    assert not lock.exists()


def test_day_without_landing_files_exits_5_and_publishes_nothing(world):
    wh, cfg = world["wh"], world["cfg"]
    before = versions(wh)
    proc = run_cli(["nightly", "--date", "2026-12-01", *settings(cfg)])
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "events/date=2026-12-01" in proc.stderr
    after = versions(wh)
    assert {k: v for k, v in after.items() if k != "ops/job_runs"} == {k: v for k, v in before.items() if k != "ops/job_runs"}


def test_corrupt_schedule_file_exits_5_naming_it(world, tmp_path):
    wh, cfg = world["wh"], world["cfg"]
    landing = tmp_path / "landing"
    shutil.copytree(cfg.landing, landing)
    # day 4 lands (events and catalog), and with it a broken schedule for day 5
    d5 = D4 + dt.timedelta(days=1)
    shutil.copytree(landing / "events" / f"date={D3}", landing / "events" / f"date={D4}")
    shutil.copy(landing / "catalog" / f"products_{D3}.csv", landing / "catalog" / f"products_{D4}.csv")
    shutil.copy(landing / "schedule" / f"streams_{D4}.csv", landing / "schedule" / f"streams_{d5}.csv")
    bad = landing / "schedule" / f"stream_products_{d5}.csv"
    bad.write_text("stream_id,product_id,slot_start_ts,slot_end_ts,live_price\nst1,p1,not-a-time,2026-11-05T10:00:00Z,9.5\n")
    before = versions(wh)
    args = settings(cfg)
    args[args.index(f"landing.root={cfg.landing}")] = f"landing.root={landing}"
    proc = run_cli(["ingest", "--date", str(D4), *args])
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert f"stream_products_{d5}.csv" in proc.stderr
    after = versions(wh)
    assert {k: v for k, v in after.items() if k != "ops/job_runs"} == {k: v for k, v in before.items() if k != "ops/job_runs"}


def test_report_of_a_night_that_never_ran_is_exit_5_naming_the_latest(world):
    wh, cfg = world["wh"], world["cfg"]
    never = dt.date(2027, 1, 1)
    proc = run_cli(["report", "--date", str(never), *settings(cfg)])
    assert proc.returncode == 5, proc.stderr[-3000:]
    from streamrank.report import NIGHT_STAGES

    latest = wh.table("ops/job_runs").read().filter(F.col("stage").isin(*NIGHT_STAGES)).agg(F.max("run_date")).first()[0]
    assert f"no stage has run for {never}" in proc.stderr
    assert f"the latest night with stage runs is {latest}" in proc.stderr
    assert not (cfg.reports / str(never)).exists()


def test_report_renders_with_images_in_headless_chromium(world, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    page = world["cfg"].reports / str(D3) / "index.html"
    assert page.exists()
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert {"rows_per_day.png", "quarantine_reasons.png"} <= set(pngs)
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-images-ok="true"' in proc.stdout, proc.stdout[:2000]
    assert f'data-images="{len(pngs)}"' in proc.stdout
    assert "Quarantine" in proc.stdout and "Rows per layer and day" in proc.stdout


@pytest.mark.parametrize("job, args, code, says, outcome", [
    ("sql", ["SELECT count(*) AS n FROM silver_viewer_events"], 0, None, None),
    ("clean", ["--date", str(D4)], 5, f"bronze/viewer_events has no rows for ingest_date={D4}", None),
    ("promote", ["--version", "0"], 2, "--version must be a registered version number >= 1", None),
    # the two faces of score's exit 5: nothing to do yet (skipped), and a schedule that never landed (a failure)
    ("score", ["--date", str(D3), "--set", "mlflow.model_name=nobody"], 5,
     "no version of model 'nobody' holds the alias 'champion'", "no_champion"),
    ("score", ["--date", str(D4)], 5, f"bronze/stream_products has no rows for snapshot_date {D4 + dt.timedelta(days=1)}", None),
    # the DAG's train task of a backfilled night: skipped, as the nightly skips it
    ("train", ["--date", str(D2), "--newest-only"], 5, f"model stages skipped: {D2} is older than challenger v",
     "older_than_challenger"),
])
def test_spark_submit_entry_points_pass_exit_codes_through(world, job, args, code, says, outcome):
    """What a scheduler runs: `spark-submit jobs/<stage>.py`, whose exit code and outcome
    line it acts on (deploy/airflow skips a task only on both: score's 5 with `no_champion`,
    never its 5 for a missing schedule)."""
    wh, cfg = world["wh"], world["cfg"]
    submit = Path(sys.executable).parent / "spark-submit"
    before = versions(wh)
    proc = subprocess.run([submit, "--master", "local[2]", f"jobs/{job}.py", *args, *settings(cfg)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
    assert proc.returncode == code, proc.stderr[-3000:]
    if says is None:
        lines = proc.stdout.splitlines()
        assert lines[0].strip() == "n" and lines[2].strip() == str(wh.table("silver/viewer_events").read().count())
    else:
        # spark-submit's PythonRunner sends the Python driver's stderr to its own stdout
        assert f"streamrank {job}: error: {says}" in proc.stdout
    outcomes = [line for line in proc.stdout.splitlines() if line.startswith(f"streamrank {job}: outcome: ")]
    assert outcomes == ([f"streamrank {job}: outcome: {outcome} (an expected state, not a failure: "
                         "`streamrank nightly` goes on past it)"] if outcome else [])
    assert {k: v for k, v in versions(wh).items() if k != "ops/job_runs"} == {k: v for k, v in before.items() if k != "ops/job_runs"}


def test_sql_views_latest_and_older_version(world, capsys, tmp_path):
    from streamrank.analyst import run_sql

    ctx, wh = world["ctx"], world["wh"]
    n_ranked = wh.table("gold/user_product_rankings").read().count()
    assert run_sql(ctx, f"SELECT count(*) AS n FROM gold_user_product_rankings WHERE score_date = '{D4}'") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip() == "n" and out[2].strip() == str(n_ranked)
    # an older version of silver: version 1 held day 1 only
    assert run_sql(ctx, "SELECT min(ingest_date) AS lo, max(ingest_date) AS hi FROM silver_viewer_events",
                   as_of_version=["silver/viewer_events=1"]) == 0
    assert out_line(capsys) == f"{D1}  {D1}"
    target = tmp_path / "q.csv"
    assert run_sql(ctx, "SELECT reason, count(*) n FROM silver_quarantine LATERAL VIEW explode(reasons) AS reason GROUP BY reason",
                   out=str(target)) == 0
    assert target.read_text().splitlines()[0] == "reason,n"


def test_the_readmes_sql_examples_answer_on_a_nightly_warehouse(world, capsys):
    """Each `streamrank sql` example of the README's analyst section runs and returns rows.

    The README's dates and ids are the demo's; here they become this warehouse's.
    """
    import re

    from streamrank.analyst import run_sql

    ctx, wh = world["ctx"], world["wh"]
    rankings = wh.table("gold/user_product_rankings")
    viewer = rankings.read().filter(f"score_date = '{D4}' AND rank = 1").agg({"viewer_id": "min"}).first()[0]
    readme = (REPO / "README.md").read_text()
    examples = re.findall(r'\.venv/bin/streamrank sql "(.*?)"(?: --as-of-version (\S+))?\n', readme, re.S)
    assert len(examples) >= 5, "the analyst section lost its examples"
    for query, pin in examples:
        query = query.replace("2026-11-08", str(D4)).replace("v0000001", viewer)
        pin = re.sub(r"=\d+$", f"={rankings.version()}", pin)
        assert run_sql(ctx, query, as_of_version=[pin] if pin else None) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) > 2 and lines[2].strip(), f"no rows from the README's example:\n{query}"


def out_line(capsys) -> str:
    return capsys.readouterr().out.splitlines()[2].strip()


def test_maintain_keeps_every_row_and_the_stages_read_its_files(world):
    """Compaction rewrites every table's small files with delta-rs's own writer; the rows stay
    the same, and features and score, which read those files, publish identical tables."""
    from streamrank.maintain import maintain
    from streamrank.nightly import run_stage

    wh, ctx = world["wh"], world["ctx"]
    names = [n for n in all_table_names() if n != "ops/job_runs"]  # maintain records itself there
    before = {n: table_rows(wh, n) for n in names}
    files = {n: len(wh.table(n).files()) for n in names}
    done = {t.table: t for t in maintain(ctx)}  # default retention (168 h): the replaced files stay for restores
    assert {n: table_rows(wh, n) for n in names} == before
    assert done["ops/job_runs"].files_compacted > 0 and done["silver/viewer_events"].files_compacted > 0
    assert all(len(wh.table(n).files()) <= files[n] for n in names)
    assert all(t.files_vacuumed == 0 for t in done.values())
    gold = ("gold/viewer_features", "gold/training_examples", "gold/user_product_rankings", "gold/user_intent_scores")
    expected = {t: table_rows(wh, t, drop=("run_id",)) for t in gold}
    for stage in ("features", "score"):
        run_stage(ctx, stage, D3)
    # money is summed as decimals (features.MONEY): the new row order cannot change a digit
    assert {t: table_rows(wh, t, drop=("run_id",)) for t in gold} == expected


def test_a_first_night_records_why_its_model_stages_did_not_run(world):
    """Night 1 has no history to train on: train says so, and evaluate and promote each have
    a row saying they were skipped because of it (no gap in the night's runs)."""
    runs = [r for r in world["ctx"].table("ops/job_runs").to_arrow().to_pylist() if r["run_date"] == D1]
    first = {r["stage"]: r for r in sorted(runs, key=lambda r: r["started_at"], reverse=True)}
    assert first["train"]["status"] == "insufficient_history" and first["train"]["exit_code"] == 5
    for stage in ("evaluate", "promote"):
        assert (first[stage]["status"], first[stage]["exit_code"]) == ("skipped", 0)
        assert first[stage]["message"] == f"not run: train found too little history for {D1} (insufficient_history)"


def test_a_backfilled_older_night_skips_the_model_stages(world):
    """Re-running a past night after a later one trained the challenger: the model stages
    belong to the newest night, so nothing is trained, evaluated or promoted, and no alias
    moves; the night still scores with the champion and says why the model stages did not run."""
    from streamrank.registry import client

    cfg, ctx, wh = world["cfg"], world["ctx"], world["wh"]
    aliases = {a: by_alias(cfg, a) for a in ("challenger", "champion")}
    assert aliases["challenger"].trained_as_of == D3
    registered = {mv.version for mv in client(cfg).search_model_versions(f"name='{cfg['mlflow.model_name']}'")}
    assert nightly(ctx, D2, from_stage="train") == 0

    assert {mv.version for mv in client(cfg).search_model_versions(f"name='{cfg['mlflow.model_name']}'")} == registered
    assert {a: by_alias(cfg, a) for a in aliases} == aliases
    runs = [r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["run_date"] == D2 and r["run_id"] == ctx.run_id]
    night = max((r for r in runs if r["stage"] == "nightly"), key=lambda r: r["started_at"])
    assert night["status"] == "success"
    metrics = json.loads(night["metrics"])
    assert {s: metrics[s] for s in ("train", "evaluate", "promote", "score")} == {
        "train": "skipped", "evaluate": "skipped", "promote": "skipped", "score": "ok"}
    assert metrics["challenger_trained_as_of"] == str(D3)
    assert f"older than challenger v{aliases['challenger'].version}" in night["message"]
    assert f"streamrank train --date {D2}" in night["message"]
    # each skipped stage has its row saying why, and the night's report shows them
    model_rows = [r for r in runs if r["stage"] in ("train", "evaluate", "promote") and r["started_at"] >= night["started_at"]]
    assert sorted((r["stage"], r["status"], r["exit_code"], r["message"]) for r in model_rows) == [
        (stage, "skipped", 0, night["message"]) for stage in ("evaluate", "promote", "train")]
    page = (cfg.reports / str(D2) / "index.html").read_text()
    assert f"older than challenger v{aliases['challenger'].version}" in page
    rescored = wh.table("gold/user_product_rankings").read().filter(F.col("score_date") == D3)
    assert rescored.count() > 0
    assert {r.model_version for r in rescored.select("model_version").distinct().collect()} == {aliases["champion"].version}


def test_train_newest_only_refuses_a_backfilled_night_and_registers_nothing(world):
    """What the Airflow DAG's train task does for a past night: no model, no alias move, a
    row that says why and how to train that night anyway; the challenger's own night is not refused."""
    from streamrank.registry import client

    cfg, ctx = world["cfg"], world["ctx"]
    challenger = by_alias(cfg, "challenger")
    assert challenger.trained_as_of == D3
    registered = {mv.version for mv in client(cfg).search_model_versions(f"name='{cfg['mlflow.model_name']}'")}
    with pytest.raises(OlderNightError, match=f"streamrank train --date {D2}` trains this night's model on purpose"):
        train(ctx, D2, newest_only=True)
    assert {mv.version for mv in client(cfg).search_model_versions(f"name='{cfg['mlflow.model_name']}'")} == registered
    assert by_alias(cfg, "challenger") == challenger
    rows = [r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "train" and r["run_date"] == D2]
    last = max(rows, key=lambda r: r["started_at"])
    assert (last["status"], last["exit_code"]) == ("older_than_challenger", 5)
    assert f"older than challenger v{challenger.version}" in last["message"]
    assert json.loads(last["metrics"])["challenger_trained_as_of"] == str(D3)
    assert newer_challenger(ctx, D3) is None and newer_challenger(ctx, D2) == challenger
