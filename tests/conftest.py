"""Shared fixtures: one local SparkSession for the whole test run (Spark start-up is slow)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def base_conf():
    """The default configuration with local[2] Spark and the rs engine."""
    from streamrank.config import load_config

    return load_config(None, ["spark.master=local[2]", "spark.shuffle_partitions=2", "spark.driver_memory=2g"], env={})


@pytest.fixture(scope="session")
def spark(base_conf):
    from streamrank.spark import build_session

    session = build_session(base_conf, app_name="streamrank-tests")
    yield session
    session.stop()


@pytest.fixture()
def conf(base_conf, tmp_path: Path):
    """Default conf pointed at a fresh warehouse and landing root under tmp_path."""
    return base_conf.with_overrides(
        {"warehouse.root": str(tmp_path / "warehouse"), "landing.root": str(tmp_path / "landing")}
    )
