"""Example Airflow DAGs: one spark-submit task per streamrank stage, for the run's logical
date (streamrank_nightly), and the weekly warehouse upkeep (streamrank_maintain).

Copy to your Airflow dags/ folder and set the `spark_default` connection to your cluster.
Each task runs the same jobs/*.py entry point the CLI uses, in client deploy mode: there
the exit code of spark-submit is the driver's, and the tasks act on it as
`streamrank nightly` does on the exceptions behind it (DESIGN section 6):

- promote exits 4 when the gate says no: the task is skipped and scoring still runs with
  the current champion;
- train exits 5 on a new warehouse's first nights (too little history): it is skipped,
  and so are evaluate and promote;
- a backfill (`airflow dags backfill`, or a cleared past run) of a night older than the
  challenger's: train runs with --newest-only, exits 5 with outcome older_than_challenger
  without training, and is skipped with evaluate and promote, as `streamrank nightly` skips
  them there (a model of that night would not become the challenger, and evaluating the
  newer one on that night's holdout scores it on rows it trained on). score and report
  still run. `streamrank train --date X` by hand trains such a night's model on purpose;
- score exits 5 while no model holds the champion alias: skipped, nothing is published;
- report always runs once the data stages succeeded; any other non-zero exit fails its
  task, and Airflow's retry re-runs that stage (every stage is idempotent), except exit 3:
  a failed data-quality gate fails at once without retries, as the same data fails the
  same gate again, and the task log names the data-docs page a person must open.

An exit code alone would skip too much: score also exits 5 when tomorrow's schedule never
landed, and that must fail loudly. So a task is skipped only when the stage also printed
the matching `streamrank <stage>: outcome: <name>` line (lib/streamrank/errors.py), which
the CLI prints for exactly these expected states.

Where things are, read when the DAG file is parsed: STREAMRANK_HOME (the checkout with
its .venv, default /opt/streamrank), STREAMRANK_CONF (default conf/cluster.yaml there)
and STREAMRANK_SPARK_PACKAGES (Maven coordinates for --packages, default delta-spark;
set it empty where the Delta jars are already on the classpath or delta.engine is rs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

REPO = os.environ.get("STREAMRANK_HOME", "/opt/streamrank")
CONF = os.environ.get("STREAMRANK_CONF", f"{REPO}/conf/cluster.yaml")
PACKAGES = os.environ.get("STREAMRANK_SPARK_PACKAGES", "io.delta:delta-spark_2.13:4.0.1") or None
STAGES = ["ingest", "clean", "features", "train", "evaluate", "promote", "score", "report"]
#: stage -> the (exit code, outcome) pairs that mean "nothing to do tonight" rather than a failure (see above)
SKIP_ON = {"train": [(5, "insufficient_history"), (5, "older_than_challenger")], "promote": [(4, "gate_not_passed")],
           "score": [(5, "no_champion")]}
#: arguments a stage's task adds to --conf and --date: train as the nightly does, newest night only
STAGE_ARGS = {"train": ["--newest-only"]}
OUTCOME = re.compile(r"^streamrank [\w-]+: outcome: (\w+)")
#: exit codes that no retry can change: a failed data-quality gate (the same data fails again)
NO_RETRY = (3,)
#: stages that run although an upstream task was skipped (not failed)
AFTER_SKIPS = {"score", "report"}


class StageSubmit(SparkSubmitOperator):
    """spark-submit of one stage, skipped on an (exit code, outcome) pair in `skip_on`.

    SparkSubmitOperator fails on every non-zero exit and has no skip option, so the exit
    code is read from the spark-submit process the hook ran, and the outcome line from
    its output as the hook logs it.
    """

    def __init__(self, *, skip_on: list[tuple[int, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skip_on = [tuple(pair) for pair in skip_on or []]
        self.outcome: str | None = None

    def _get_hook(self) -> Any:
        hook = super()._get_hook()
        process = hook._process_spark_submit_log
        hook._process_spark_submit_log = lambda itr: process(self._watch(itr))
        return hook

    def _watch(self, lines: Iterator[Any]) -> Iterator[Any]:
        for line in lines:
            found = OUTCOME.match(str(line).strip())
            if found:
                self.outcome = found.group(1)
            yield line

    def execute(self, context: Any) -> None:
        try:
            super().execute(context)
        except AirflowException:
            code = getattr(getattr(self._hook, "_submit_sp", None), "returncode", None)
            if (code, self.outcome) in self.skip_on:
                raise AirflowSkipException(f"{self.task_id} exited {code} ({self.outcome}): nothing to do tonight") from None
            if code in NO_RETRY:
                raise AirflowFailException(f"{self.task_id} exited {code}: the data-quality gate failed, "
                                           "see the data-docs page named in the log; not retried") from None
            raise


with DAG(
    dag_id="streamrank_nightly",
    start_date=datetime(2026, 11, 1),
    schedule="30 1 * * *",  # 01:30 UTC, after the platform's landing drop
    catchup=False,
    max_active_runs=1,      # the tasks are single stages and take no warehouse lock: one night at a time
    # A retry can start while a lost attempt still runs on its old worker. Ingest's second commit
    # of the same landing files refuses (exit 1); a replace either refuses (the files it read
    # changed) or writes the same rows again; train may register one more challenger version.
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
) as dag:
    previous = None
    for stage in STAGES:
        task = StageSubmit(
            task_id=stage,
            application=f"{REPO}/jobs/{stage}.py",
            application_args=["--conf", CONF, "--date", "{{ ds }}", *STAGE_ARGS.get(stage, [])],
            packages=PACKAGES,
            conn_id="spark_default",
            deploy_mode="client",  # in cluster mode spark-submit's exit code is not the driver's
            conf={"spark.executorEnv.PYSPARK_PYTHON": f"{REPO}/.venv/bin/python",
                  "spark.pyspark.driver.python": f"{REPO}/.venv/bin/python"},
            skip_on=SKIP_ON.get(stage),
            trigger_rule="none_failed" if stage in AFTER_SKIPS else "all_success",
        )
        if previous is not None:
            previous >> task
        previous = task

with DAG(
    dag_id="streamrank_maintain",
    start_date=datetime(2026, 11, 1),
    # Sundays 06:00 UTC, well after the night's run. A `streamrank nightly` holding the lock
    # fails it (retried later); a compaction beside a stage task makes that stage's commit
    # refuse (ConcurrentWriteError, exit 1) and Airflow's retry re-runs it: no rows are doubled.
    schedule="0 6 * * 0",
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=30)},
) as maintain_dag:
    StageSubmit(
        task_id="maintain",
        application=f"{REPO}/jobs/maintain.py",
        application_args=["--conf", CONF],  # compaction, then vacuum at delta.vacuum_retention_hours
        packages=PACKAGES,
        conn_id="spark_default",
        deploy_mode="client",
        conf={"spark.executorEnv.PYSPARK_PYTHON": f"{REPO}/.venv/bin/python",
              "spark.pyspark.driver.python": f"{REPO}/.venv/bin/python"},
    )
