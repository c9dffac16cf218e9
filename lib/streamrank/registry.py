"""MLflow wiring: one tracking/registry setup and the alias operations promotion needs.

The embedded default is a sqlite store under the warehouse with artifacts on local disk,
so a laptop run is self-contained; conf/cluster.yaml points the same code at a server.
Aliases, not stages, carry meaning: `challenger` is the model trained as of the latest
night (a backfill of an older night does not take it), `champion` is what scoring uses,
`previous` is the champion before the last promotion (rollback).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrank.config import REPO_ROOT, Config

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"

#: What a person browsing the registry (MLflow UI) reads first about the model.
MODEL_DESCRIPTION = (
    "streamrank's attention model for live-stream commerce. From a viewer's last behaviour events, "
    "purchase power and the products of tomorrow's streams it gives a ranking score and a purchase "
    "probability per (viewer, candidate) and the viewer's intent to buy (an MLflow pyfunc: a pandas "
    "DataFrame of histories and candidates in, scores and probabilities out; see each version's "
    "signature and input example).\n\n"
    f"Aliases: `{CHAMPION}` is what `streamrank score` serves, `{CHALLENGER}` the version trained as of "
    f"the latest night, `{PREVIOUS}` the champion before the last promotion. Move them with `streamrank promote` "
    "(the gate against the champion and most-popular, or `--version N --force --reason TEXT`, or "
    "`--rollback`), which records each decision in the version's gate.* and promoted_* tags."
)


def setup_mlflow(cfg: Config) -> str:
    """Point MLflow at the configured stores and return the experiment id."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import mlflow

    if cfg.mlflow_tracking_uri.startswith("sqlite:///"):
        Path(cfg.mlflow_tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow_registry_uri)
    name = cfg["mlflow.experiment"]
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=cfg.mlflow_artifact_root)
        except Exception:  # noqa: BLE001 - another process created it first
            pass
    return mlflow.set_experiment(name).experiment_id


def client(cfg: Config):  # noqa: ANN201 - MlflowClient
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    return MlflowClient()


@dataclass(frozen=True)
class ModelRef:
    """A registered model version and the run that produced it."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def trained_as_of(self) -> dt.date | None:
        """The night it was trained as of (train's `as_of_date` tag); None when unknown."""
        try:
            return dt.date.fromisoformat(self.tags.get("as_of_date", ""))
        except ValueError:
            return None

    def trained_after(self, day: dt.date) -> bool:
        """Whether it was trained as of a night after `day`, so on that night's holdout and
        on the events of the days after it."""
        return self.trained_as_of is not None and self.trained_as_of > day


def by_alias(cfg: Config, alias: str) -> ModelRef | None:
    """The version holding `alias`, or None when no version has it."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = cfg["mlflow.model_name"]
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return ModelRef(name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def by_version(cfg: Config, version: int | str) -> ModelRef | None:
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = cfg["mlflow.model_name"]
    try:
        mv = c.get_model_version(name, str(version))
    except MlflowException:
        return None
    return ModelRef(name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def set_alias(cfg: Config, alias: str, version: str) -> None:
    client(cfg).set_registered_model_alias(cfg["mlflow.model_name"], alias, str(version))


def tag_version(cfg: Config, version: str, tags: dict[str, Any]) -> None:
    c = client(cfg)
    for key, value in tags.items():
        c.set_model_version_tag(cfg["mlflow.model_name"], str(version), key, str(value))


def describe_version(cfg: Config, version: str, text: str) -> None:
    """Set a version's description, and the registered model's where it has none yet.

    Tags hold the machine-readable facts; the descriptions are what the MLflow UI shows a
    person deciding on a promotion.
    """
    c = client(cfg)
    name = cfg["mlflow.model_name"]
    c.update_model_version(name, str(version), description=text)
    if not c.get_registered_model(name).description:
        c.update_registered_model(name, description=MODEL_DESCRIPTION)


def git_commit() -> str:
    """The code version a model was trained with ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
