"""Example Airflow DAG: one SparkSubmitOperator per streamrank stage.

Copy to your Airflow dags/ folder and set the `spark_default` connection to your cluster.
Each task runs the same jobs/*.py entry point the CLI uses, for the logical date of the
run ({{ ds }}). A promotion gate that says no exits 4: that task is marked skipped
(skip_on_exit_code) and scoring still runs with the current champion.
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

REPO = "/opt/streamrank"
CONF = f"{REPO}/conf/cluster.yaml"
DELTA = "io.delta:delta-spark_2.13:4.0.1"
STAGES = ["ingest", "clean", "features", "train", "evaluate", "promote", "score", "report"]

with DAG(
    dag_id="streamrank_nightly",
    start_date=datetime(2026, 11, 1),
    schedule="30 1 * * *",  # 01:30 UTC, after the platform's landing drop
    catchup=False,
    max_active_runs=1,      # the warehouse lock enforces this too
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
) as dag:
    previous = None
    for stage in STAGES:
        task = SparkSubmitOperator(
            task_id=stage,
            application=f"{REPO}/jobs/{stage}.py",
            application_args=["--conf", CONF, "--date", "{{ ds }}"],
            packages=DELTA,
            conn_id="spark_default",
            conf={"spark.executorEnv.PYSPARK_PYTHON": f"{REPO}/.venv/bin/python"},
            skip_on_exit_code=4 if stage == "promote" else None,
            trigger_rule="none_failed" if stage == "score" else "all_success",
        )
        if previous is not None:
            previous >> task
        previous = task
