"""Configuration: layering and exit-2 validation of keys, types and dates."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrank.cli import main
from streamrank.config import load_config, parse_date
from streamrank.errors import ConfigError


def test_layers_file_then_env_then_set(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("spark:\n  master: local[3]\nscore:\n  top_k: 7\ntrain:\n  lr: 0.5\n")
    cfg = load_config(conf, ["train.lr=0.25"], env={"STREAMRANK_SCORE__TOP_K": "9", "STREAMRANK_TRAIN__LR": "0.4"})
    assert cfg["spark.master"] == "local[3]"      # file beats default
    assert cfg["score.top_k"] == 9                 # env beats file
    assert cfg["train.lr"] == 0.25                 # --set beats env
    assert cfg["model.d_model"] == 64              # untouched default
    assert cfg.mlflow_tracking_uri.startswith("sqlite:///") and cfg.mlflow_tracking_uri.endswith("mlflow.db")


def test_cluster_example_is_valid():
    cfg = load_config("conf/cluster.yaml", env={})
    assert cfg["delta.engine"] == "spark"
    assert cfg["spark.extra"]["spark.executor.resource.gpu.amount"] == "1"
    assert cfg["score.precision"] == "fp32"  # the driver cannot see the executors' CPUs


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sprak.master=local", "unknown config key 'sprak'"),
        ("spark.masterr=local", "unknown config key 'spark.masterr'"),
        ("train.lr=fast", "'train.lr' (--set train.lr): expected a number"),
        ("score.top_k=1.5", "'score.top_k' (--set score.top_k): expected an integer"),
        ("delta.engine=duckdb", "'delta.engine': expected one of auto, spark, rs"),
        ("score.precision=fp16", "'score.precision': expected one of auto, fp32, bf16"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_override_names_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], env={})
    assert needle in str(err.value)


def test_with_overrides_checks_choices_too():
    """Stages and tests derive configs with with_overrides: a bad word must not slip through there."""
    base = load_config(None, env={})
    assert base.with_overrides({"score.precision": "bf16"})["score.precision"] == "bf16"
    for key, value in (("score.precision", "fp16"), ("delta.engine", "duckdb")):
        with pytest.raises(ConfigError, match=f"'{key}': expected one of"):
            base.with_overrides({key: value})


def test_bad_env_and_file(tmp_path):
    with pytest.raises(ConfigError, match="env STREAMRANK_SCORE__TOP_K"):
        load_config(None, env={"STREAMRANK_SCORE__TOP_K": "many"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  mastr: x\n")
    with pytest.raises(ConfigError, match="unknown config key 'spark.mastr'"):
        load_config(bad, env={})


@pytest.mark.parametrize("override, needle", [
    ("clean.dedup_lookback_days=-1", "'clean.dedup_lookback_days' (--set clean.dedup_lookback_days): expected >= 0, got -1"),
    ("quality.max_quarantine_ratio=1.5",
     "'quality.max_quarantine_ratio' (--set quality.max_quarantine_ratio): expected between 0 and 1, got 1.5"),
    ("score.top_k=0", "'score.top_k' (--set score.top_k): expected >= 1, got 0"),
    ("model.dropout=1", "'model.dropout' (--set model.dropout): expected >= 0 and < 1, got 1.0"),
    ("train.lr=.nan", "'train.lr' (--set train.lr): expected > 0, got nan"),
    ("train.cpu_threads=true", "'train.cpu_threads' (--set train.cpu_threads): expected >= 1, got True"),
    ("spark.master=", "'spark.master' (--set spark.master): expected a non-empty string, got ''"),
])
def test_values_out_of_range_name_the_key(override, needle):
    """A value of the right type that a stage would act on wrongly (a dedup that looks at no
    earlier day, a quarantine gate that cannot fail, a JVM that cannot start) is exit 2 too."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], env={})
    assert needle in str(err.value)


def test_ranges_hold_for_every_shipped_conf_and_at_their_edges():
    for conf in (None, Path(__file__).resolve().parents[2] / "conf" / "cluster.yaml"):
        load_config(conf, env={})
    edges = ["clean.dedup_lookback_days=0", "quality.max_quarantine_ratio=1", "quality.max_quarantine_ratio=0",
             "model.dropout=0", "train.cpu_threads=null", "train.cpu_threads=1", "model.n_hosts=0"]
    cfg = load_config(None, edges, env={})
    assert (cfg["clean.dedup_lookback_days"], cfg["quality.max_quarantine_ratio"], cfg["train.cpu_threads"]) == (0, 0.0, 1)
    with pytest.raises(ConfigError, match="'score.batch_size' \\(override\\): expected >= 1, got -5"):
        cfg.with_overrides({"score.batch_size": -5})


@pytest.mark.parametrize("value", ["2026-1-01", "20261101", "2026-02-30", "yesterday"])
def test_dates_are_strict(value):
    with pytest.raises(ConfigError, match="YYYY-MM-DD|valid calendar date"):
        parse_date(value)


def test_cli_exit_2_names_the_key(capsys):
    assert main(["init", "--set", "warehouse.rot=/tmp/x"]) == 2
    assert "unknown config key 'warehouse.rot'" in capsys.readouterr().err


DEFAULT = str(Path(__file__).resolve().parents[2] / "conf" / "local.yaml")


@pytest.mark.parametrize(("argv", "conf", "sets"), [
    (["--conf", "a.yaml", "--set", "x=1", "clean", "--date", "2026-11-01"], "a.yaml", ["x=1"]),
    (["clean", "--conf", "a.yaml", "--set", "x=1", "--date", "2026-11-01"], "a.yaml", ["x=1"]),
    (["--conf", "a.yaml", "--set", "x=1", "clean", "--conf", "b.yaml", "--set", "y=2", "--date", "2026-11-01"],
     "b.yaml", ["x=1", "y=2"]),
    (["clean", "--date", "2026-11-01"], DEFAULT, []),
])
def test_conf_and_set_count_before_the_command_too(argv, conf, sets, monkeypatch, capsys):
    seen = []

    def load(path, overrides):
        seen.append((str(path), list(overrides)))
        raise ConfigError("loaded")

    monkeypatch.setattr("streamrank.config.load_config", load)
    assert main(argv) == 2
    assert seen == [(conf, sets)]
    assert "streamrank clean: error: loaded" in capsys.readouterr().err


def test_cli_malformed_date_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--start", "2026-13-01"])
    assert exit_.value.code == 2
    assert "'2026-13-01' is not a valid calendar date" in capsys.readouterr().err


def test_delta_packages_reach_the_session_settings():
    from streamrank.spark import delta_settings

    cfg = load_config(None, env={})
    assert delta_settings(cfg)["spark.jars.packages"] == cfg["delta.packages"]
    pinned = load_config(None, ["delta.packages=io.delta:delta-spark_2.13:4.0.0"], env={})
    assert delta_settings(pinned)["spark.jars.packages"] == "io.delta:delta-spark_2.13:4.0.0"
    # the user's own packages in spark.extra are kept beside Delta's, not overwritten by them
    both = load_config(None, ["spark.extra={\"spark.jars.packages\": \"org.example:x_2.13:1.0\"}"], env={})
    assert delta_settings(both)["spark.jars.packages"] == f"{cfg['delta.packages']},org.example:x_2.13:1.0"
    # jars already on the machine win, and need no Maven
    local = delta_settings(cfg, ["/j/delta-spark_2.13-4.0.1.jar", "/j/delta-storage-4.0.1.jar"])
    assert local["spark.jars"] == "/j/delta-spark_2.13-4.0.1.jar,/j/delta-storage-4.0.1.jar"
    assert "spark.jars.packages" not in local
    # empty: delta-spark's own configure_spark_with_delta_pip picks the coordinates
    assert "spark.jars.packages" not in delta_settings(load_config(None, ["delta.packages="], env={}))
    assert delta_settings(cfg)["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"


@pytest.mark.parametrize("conf", [None, "conf/cluster.yaml"])
def test_delta_packages_match_the_installed_delta_spark(conf):
    """The JVM jars and the Python API come from the same delta-spark release."""
    from importlib.metadata import version

    assert load_config(conf, env={})["delta.packages"].rsplit(":", 1)[1] == version("delta-spark")
