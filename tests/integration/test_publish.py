"""Multi-table publication: a stage's tables move together, also when its process dies between commits."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest
from pyspark.sql import functions as F

from streamrank.context import Context, StageRun, stage_run
from streamrank.delta import InjectedFault
from streamrank.errors import StreamrankError
from streamrank.publish import JOURNAL_DIR, Publication, publication, publish_staged, recover

RANKINGS, INTENT = "gold/user_product_rankings", "gold/user_intent_scores"
D = dt.date(2026, 11, 8)


def rankings(spark, run_id: str, n: int = 6):
    return spark.range(n).select(
        F.concat(F.lit("v"), (F.col("id") % 3).cast("string")).alias("viewer_id"), (F.col("id") + 1).cast("int").alias("rank"),
        F.concat(F.lit("p"), F.col("id").cast("string")).alias("product_id"), F.lit("st1").alias("stream_id"),
        F.timestamp_seconds(F.lit(1_794_000_000)).alias("slot_start"), F.col("id").cast("double").alias("score"),
        F.lit(0.1).alias("purchase_prob"), F.lit("model").alias("strategy"), F.lit("1").alias("model_version"),
        F.lit(run_id).alias("run_id"), F.lit(D).alias("score_date"),
    )


def intent(spark, run_id: str, n: int = 3):
    return spark.range(n).select(
        F.concat(F.lit("v"), F.col("id").cast("string")).alias("viewer_id"), F.lit(0.2).alias("intent_score"),
        F.lit(1.0).alias("purchase_power"), F.lit("1").alias("model_version"), F.lit(run_id).alias("run_id"),
        F.lit(D).alias("score_date"),
    )


def run_ids(ctx: Context, name: str) -> list[str]:
    return sorted({r.run_id for r in ctx.table(name).read().select("run_id").collect()})


def publish_night(spark, ctx: Context) -> None:
    """One complete publication of both tables by ctx's run."""
    commit = {"stage": "score", "run_id": ctx.run_id}
    staged = [(name, ctx.table(name).stage_overwrite(frame(spark, ctx.run_id), where={"score_date": D}, commit_info=commit))
              for name, frame in ((RANKINGS, rankings), (INTENT, intent))]
    publish_staged(ctx, "score", StageRun("score", D, ctx.run_id), staged)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def journals(ctx: Context, sub: str = "") -> list[str]:
    root = ctx.cfg.warehouse / JOURNAL_DIR / sub
    return sorted(p.name for p in root.glob("*.json")) if root.is_dir() else []


def die_mid_publication(spark, conf, run_id: str, done: tuple[str, ...]) -> Context:
    """What a SIGKILL after committing `done` leaves: their commits and a journal of a dead pid."""
    ctx = Context(conf, run_id=run_id)
    pub = Publication.open(ctx, "score", (RANKINGS, INTENT))  # what `publication` does on entry
    for name in done:
        frame = rankings if name == RANKINGS else intent
        ctx.table(name).overwrite(frame(spark, run_id), where={"score_date": D}, commit_info={"run_id": run_id})
        pub.done(name)
    doc = json.loads(pub.path.read_text())
    doc["pid"] = dead_pid()
    pub.path.write_text(json.dumps(doc))
    return ctx


@pytest.fixture()
def night1(spark, conf):
    ctx = Context(conf, run_id="night1")
    publish_night(spark, ctx)
    return ctx


def test_publication_commits_both_tables_and_leaves_no_journal(night1):
    assert run_ids(night1, RANKINGS) == run_ids(night1, INTENT) == ["night1"]
    assert night1.table(RANKINGS).read().count() == 6 and night1.table(INTENT).read().count() == 3
    assert journals(night1) == []


def test_failed_second_commit_rolls_the_first_back_in_process(spark, conf, night1, monkeypatch):
    before = {n: night1.table(n).version() for n in (RANKINGS, INTENT)}
    monkeypatch.setenv("STREAMRANK_FAULT_BEFORE_COMMIT", f"{INTENT}:raise")
    with pytest.raises(InjectedFault):
        publish_night(spark, Context(conf, run_id="night2"))
    monkeypatch.delenv("STREAMRANK_FAULT_BEFORE_COMMIT")
    assert run_ids(night1, RANKINGS) == run_ids(night1, INTENT) == ["night1"]
    assert night1.table(RANKINGS).version() == before[RANKINGS] + 2  # night2's commit, then its restore
    assert night1.table(INTENT).version() == before[INTENT]
    assert night1.table(RANKINGS).history(1)[0]["operation"] == "RESTORE"
    assert journals(night1) == []


def test_next_stage_run_restores_what_a_dead_run_half_published(spark, conf, night1):
    die_mid_publication(spark, conf, "killed", done=(RANKINGS,))
    assert run_ids(night1, RANKINGS) == ["killed"] and run_ids(night1, INTENT) == ["night1"]  # the window
    assert len(journals(night1)) == 1
    later = Context(conf, run_id="later")
    with stage_run(later, "report", D) as run:  # any stage run recovers first
        pass
    assert run_ids(night1, RANKINGS) == run_ids(night1, INTENT) == ["night1"]
    assert night1.table(RANKINGS).read().count() == 6
    assert len(run.metrics["recovered"]) == 1 and f"{RANKINGS} to v" in run.metrics["recovered"][0]
    assert journals(night1) == []
    assert recover(later) == []  # resolved once


def test_dead_run_that_committed_everything_keeps_its_publication(spark, conf, night1):
    die_mid_publication(spark, conf, "finished", done=(RANKINGS, INTENT))
    versions = {n: night1.table(n).version() for n in (RANKINGS, INTENT)}
    lines = recover(Context(conf))
    assert len(lines) == 1 and "stands" in lines[0]
    assert run_ids(night1, RANKINGS) == run_ids(night1, INTENT) == ["finished"]
    assert {n: night1.table(n).version() for n in (RANKINGS, INTENT)} == versions
    assert journals(night1) == []


def test_live_writers_journal_is_left_alone(spark, conf, night1):
    ctx = Context(conf, run_id="running")
    with publication(ctx, "score", (RANKINGS, INTENT)):
        assert recover(Context(conf)) == []
        assert journals(night1) == ["running-score.json"]
    assert journals(night1) == []


def test_a_later_commit_of_another_run_is_never_undone(spark, conf, night1):
    die_mid_publication(spark, conf, "killed", done=(RANKINGS,))
    night1.table(RANKINGS).overwrite(rankings(spark, "manual"), where={"score_date": D}, commit_info={"run_id": "manual"})
    lines = recover(Context(conf))
    assert len(lines) == 1 and "commits of other runs" in lines[0] and "nothing was restored" in lines[0]
    assert run_ids(night1, RANKINGS) == ["manual"]
    assert journals(night1) == [] and journals(night1, "unresolved") == ["killed-score.json"]


def test_a_restore_that_cannot_happen_stops_with_the_journal_named_and_kept(spark, conf, night1):
    die_mid_publication(spark, conf, "killed", done=(RANKINGS,))
    night1.table(RANKINGS).vacuum(retention_hours=0)  # the files of the version to restore are gone
    with pytest.raises(StreamrankError, match=r"could not be restored.*killed-score\.json.*unresolved"):
        recover(Context(conf))
    assert journals(night1) == ["killed-score.json"]  # unclaimed: the next stage run retries
    assert run_ids(night1, RANKINGS) == ["killed"]


def test_a_recovery_cut_short_is_finished_without_restoring_twice(spark, conf, night1):
    die_mid_publication(spark, conf, "killed", done=(RANKINGS,))
    table = night1.table(RANKINGS)
    # what a recovery that restored this table and then died leaves behind
    table.restore(table.version() - 1, commit_info={"stage": "recover", "run_id": "r", "rolled_back_run": "killed"})
    version = table.version()
    lines = recover(Context(conf))
    assert len(lines) == 1 and "no table of it needed restoring" in lines[0]
    assert table.version() == version and run_ids(night1, RANKINGS) == ["night1"]
    assert journals(night1) == [] and journals(night1, "unresolved") == []
