"""`streamrank sql`: what an analyst sees when a query or a pinned version is wrong.

The rows a good query returns are checked end to end in tests/e2e (test_sql_views_latest_
and_older_version); here a small warehouse of ops/model_eval rows is enough.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from streamrank.analyst import named_tables, run_sql
from streamrank.context import Context
from streamrank.errors import MissingInputError, UsageError

D1 = dt.date(2026, 11, 1)


def eval_rows(spark, n: int, value: float):
    return spark.range(n).select(
        F.lit("r1").alias("run_id"), F.lit("m").alias("mlflow_run_id"), F.lit("ranker").alias("model_name"),
        F.lit("1").alias("model_version"), F.lit("challenger").alias("candidate"),
        F.concat(F.lit("metric_"), F.col("id").cast("string")).alias("metric"), F.lit(value).alias("value"),
        F.timestamp_seconds(F.lit(1_790_000_000) + F.col("id")).alias("recorded_at"), F.lit(D1).alias("run_date"),
    )


@pytest.fixture()
def ctx(spark, conf):
    """A warehouse whose ops/model_eval went v1: 3 rows of 1.0, v2: 5 rows of 2.0 (a replace)."""
    ctx = Context(conf)
    ctx.spark = spark
    ctx.warehouse.create_all()
    table = ctx.table("ops/model_eval")
    table.append(eval_rows(spark, 3, 1.0))
    table.overwrite(eval_rows(spark, 5, 2.0), where={"run_date": D1})
    return ctx


def first_out_line(capsys) -> str:
    return capsys.readouterr().out.splitlines()[2].strip()


@pytest.mark.parametrize(("query", "says", "not_says"), [
    ("SELEC count(*) FROM ops_model_eval", ["[PARSE_SYNTAX_ERROR]", "== SQL ==\nSELEC count(*) FROM ops_model_eval\n^^^"], []),
    ("SELECT valu FROM ops_model_eval", ["[UNRESOLVED_COLUMN.WITH_SUGGESTION]", "`value`", "line 1 pos 7"], ["Project ["]),
    ("SELECT * FROM model_eval", ["[TABLE_OR_VIEW_NOT_FOUND]", "views named <layer>_<table>: bronze_products,", "ops_model_eval"],
     ["UnresolvedRelation"]),
    ("SELECT sum(value) / 0 FROM ops_model_eval", ["[DIVIDE_BY_ZERO]", "try_divide", "== SQL (line 1, position 8) =="], []),
    ("SELECT CAST(metric AS INT) FROM ops_model_eval", ["[CAST_INVALID_INPUT]", "try_cast"], []),
])
def test_a_mistake_in_the_query_is_exit_2_with_sparks_message_only(ctx, capsys, query, says, not_says):
    with pytest.raises(UsageError) as caught:
        run_sql(ctx, query)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert message.startswith("the query failed: ")
    for text in says:
        assert text in message
    for text in [*not_says, "JVM stacktrace", "at org.apache.spark", "Traceback"]:
        assert text not in message
    assert capsys.readouterr().out == ""
    # the quieted loggers are back as they were: the next query's failures are Spark's to log again
    assert logging.getLogger("SQLQueryContextLogger").level == logging.NOTSET
    root = ctx.spark._jvm.org.apache.logging.log4j.LogManager.getRootLogger()
    assert str(root.getLevel()) == ctx.cfg["spark.log_level"]
    # and the session still answers
    assert run_sql(ctx, "SELECT count(*) AS n FROM ops_model_eval") == 0
    assert first_out_line(capsys) == "5"


def test_pinned_versions_the_table_had_never_had_or_no_longer_has(ctx, capsys):
    table = ctx.table("ops/model_eval")
    assert run_sql(ctx, "SELECT count(*) AS n, sum(value) AS s FROM ops_model_eval", as_of_version=["ops/model_eval=1"]) == 0
    assert first_out_line(capsys) == "3  3.0"
    with pytest.raises(UsageError, match=r"^--as-of-version ops/model_eval=3: ops/model_eval is at version 2$"):
        run_sql(ctx, "SELECT 1", as_of_version=["ops_model_eval=3"])
    assert table.vacuum(retention_hours=0)  # v1's file is no longer needed by the latest version
    with pytest.raises(MissingInputError, match=r"ops/model_eval=1: \[PATH_NOT_FOUND\][\s\S]*`streamrank maintain` vacuums") as gone:
        run_sql(ctx, "SELECT count(*) FROM ops_model_eval", as_of_version=["ops/model_eval=1"])
    assert gone.value.exit_code == 5
    assert run_sql(ctx, "SELECT count(*) AS n FROM ops_model_eval", as_of_version=["ops/model_eval=2"]) == 0
    assert first_out_line(capsys) == "5"


def test_a_file_removed_while_the_query_reads_it_is_exit_5_naming_it(ctx, capsys, monkeypatch):
    from streamrank import analyst

    table = ctx.table("ops/model_eval")
    victim = table.files()[0]
    register = analyst.register_views

    def register_then_vacuum(*args, **kwargs):  # the view is planned over the file; then it goes
        names = register(*args, **kwargs)
        Path(victim.removeprefix("file://")).unlink()
        return names

    monkeypatch.setattr(analyst, "register_views", register_then_vacuum)
    with pytest.raises(MissingInputError) as gone:
        run_sql(ctx, "SELECT count(*) AS n, sum(value) AS s FROM ops_model_eval")
    assert gone.value.exit_code == 5
    message = str(gone.value)
    assert message.startswith("the query failed: a file of a table it reads was removed while it ran: ")
    assert Path(victim.removeprefix("file://")).name in message
    assert "`streamrank maintain` vacuums" in message
    assert "at org.apache" not in message and capsys.readouterr().out == ""
    root = ctx.spark._jvm.org.apache.logging.log4j.LogManager.getRootLogger()
    assert str(root.getLevel()) == ctx.cfg["spark.log_level"]


def test_output_settings_are_checked_before_the_query_runs(ctx, tmp_path, capsys):
    target = tmp_path / "result.txt"
    with pytest.raises(UsageError, match=r"--out .*result.txt: expected a .csv or .parquet file name"):
        run_sql(ctx, "SELECT * FROM ops_model_eval", out=str(target))
    assert not target.exists()
    with pytest.raises(UsageError, match=r"--out .*nowhere/result.csv: .*nowhere is not a directory this user can write to"):
        run_sql(ctx, "SELECT * FROM ops_model_eval", out=str(tmp_path / "nowhere" / "result.csv"))
    with pytest.raises(UsageError, match=r"--limit -1: expected a number of rows >= 0"):
        run_sql(ctx, "SELECT * FROM ops_model_eval", limit=-1)
    assert run_sql(ctx, "SELECT * FROM ops_model_eval", out=str(tmp_path / "result.csv")) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'result.csv'} (5 rows)"
    assert len((tmp_path / "result.csv").read_text().splitlines()) == 6


def test_only_the_views_a_query_names_are_registered():
    query = "SELECT * FROM GOLD_user_product_rankings r JOIN `ops_job_runs` j ON true WHERE r.x = 'silver_quarantine_old'"
    assert named_tables(query) == {"gold/user_product_rankings", "ops/job_runs"}
    assert named_tables("SELECT * FROM ops_job_runs_backup, my_ops_job_runs") == set()
    assert named_tables("SELECT 1") == set()
