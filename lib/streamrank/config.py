"""Layered, validated configuration.

The shipped conf/local.yaml is both the embedded default and the schema: every key a
stage may read is declared there with a value of the right type. Layers, later wins:
that file, the --conf file, STREAMRANK_* environment variables (a double underscore
separates levels: STREAMRANK_SPARK__MASTER=local[4]), then --set key=value. A key that
is not in the schema, a value of the wrong type, or a number outside its range (RANGES)
is a ConfigError (exit 2) naming the key and the expected form, so a typo never silently
falls back to a default and a stage never acts on a value that makes no sense.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from streamrank.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONF = REPO_ROOT / "conf" / "local.yaml"
ENV_PREFIX = "STREAMRANK_"
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Keys whose value is a free-form mapping (any sub-key allowed).
_FREE_FORM = {"spark.extra"}


def parse_date(value: str, what: str = "--date") -> dt.date:
    """Parse a strict YYYY-MM-DD date or raise ConfigError naming the argument."""
    if not isinstance(value, str) or not _DATE_RE.match(value):
        raise ConfigError(f"{what}: expected a date as YYYY-MM-DD, got {value!r}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {value!r} is not a valid calendar date ({exc})") from None


class Config:
    """Read-only view over the merged configuration, addressed by dotted keys."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self._data = copy.deepcopy(dict(data))
        self.source = source

    def __getitem__(self, key: str) -> Any:
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"config key {key!r} is not set")
            node = node[part]
        return copy.deepcopy(node)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except ConfigError:
            return default

    def section(self, name: str) -> dict[str, Any]:
        value = self[name]
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {name!r} is not a section")
        return dict(value)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def path(self, key: str) -> Path:
        """A filesystem path setting, resolved against the current directory."""
        return Path(str(self[key])).expanduser().resolve()

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        data = self.to_dict()
        schema = _load_yaml(DEFAULT_CONF)
        for key, value in overrides.items():
            _set_checked(data, schema, key, value, origin="override")
        _check_choices(data)
        return Config(data, self.source)

    # Derived locations, one place so every stage agrees.
    @property
    def warehouse(self) -> Path:
        return self.path("warehouse.root")

    @property
    def landing(self) -> Path:
        return self.path("landing.root")

    @property
    def reports(self) -> Path:
        return self.warehouse / "reports"

    @property
    def mlflow_tracking_uri(self) -> str:
        uri = self["mlflow.tracking_uri"]
        return uri or f"sqlite:///{self.warehouse / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_registry_uri(self) -> str:
        return self["mlflow.registry_uri"] or self.mlflow_tracking_uri

    @property
    def mlflow_artifact_root(self) -> str:
        return self["mlflow.artifact_root"] or (self.warehouse / "mlflow" / "artifacts").as_uri()


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"--conf: file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--conf: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--conf: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _coerce(key: str, default: Any, value: Any, origin: str) -> Any:
    """Check `value` against the type of the schema's `default`, parsing text from env/--set."""
    if default is None:  # an optional setting (null in the schema): any scalar, parsed as YAML
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"config key {key!r} ({origin}): expected a single value, got {value!r}")
        _check_range(key, value, origin)
        return value
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    ok = (
        (isinstance(default, bool) and isinstance(value, bool))
        or (isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (isinstance(default, str) and isinstance(value, (str, int, float)) and not isinstance(value, bool))
        or (isinstance(default, Mapping) and isinstance(value, Mapping))
    )
    if not ok:
        raise ConfigError(f"config key {key!r} ({origin}): expected {_type_name(default)}, got {value!r}")
    if isinstance(default, float):
        value = float(value)
    elif isinstance(default, str):
        value = str(value)
    _check_range(key, value, origin)
    return value


def _number(test: Any, wanted: str) -> tuple[Any, str]:
    """A range check for a numeric setting; optional (null) settings arrive parsed from YAML,
    so the type is checked here too (a bool is not a number)."""
    def check(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v)
    return check, wanted


_FRACTION = _number(lambda v: 0 <= v <= 1, "between 0 and 1")
_POSITIVE = _number(lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = _number(lambda v: v >= 0, ">= 0")
_NOT_EMPTY = ((lambda v: isinstance(v, str) and bool(v.strip())), "a non-empty string")

#: Settings whose value must lie in a range; a value outside it is a ConfigError naming the key.
#: Why: the types alone let through a negative lookback or a ratio of 1.5, which a stage would
#: silently act on (a dedup that looks at no earlier day, a gate that can never fail).
RANGES: dict[str, tuple[Any, str]] = {
    "spark.master": _NOT_EMPTY, "spark.app_name": _NOT_EMPTY, "spark.driver_memory": _NOT_EMPTY,
    "spark.shuffle_partitions": _POSITIVE,
    "delta.vacuum_retention_hours": _NON_NEGATIVE,
    "warehouse.root": _NOT_EMPTY, "landing.root": _NOT_EMPTY,
    "mlflow.experiment": _NOT_EMPTY, "mlflow.model_name": _NOT_EMPTY,
    "ingest.max_files_per_commit": _POSITIVE,
    "clean.max_lateness_days": _NON_NEGATIVE, "clean.future_tolerance_hours": _NON_NEGATIVE,
    "clean.dedup_lookback_days": _NON_NEGATIVE, "clean.bot_max_events_per_minute": _POSITIVE,
    "clean.bot_max_purchases_per_hour": _POSITIVE, "clean.max_dwell_ms": _NON_NEGATIVE,
    "clean.max_quantity": _POSITIVE, "clean.max_price": _NON_NEGATIVE,
    "quality.max_quarantine_ratio": _FRACTION, "quality.volume_band": _NON_NEGATIVE,
    "features.seq_len": _POSITIVE, "features.history_days": _POSITIVE, "features.cand_size": _POSITIVE,
    "features.target_size": _POSITIVE, "features.cutoffs_per_day": _POSITIVE, "features.train_days": _POSITIVE,
    "features.test_share": _FRACTION,
    "model.d_model": _POSITIVE, "model.n_heads": _POSITIVE, "model.n_layers": _POSITIVE,
    "model.dropout": _number(lambda v: 0 <= v < 1, ">= 0 and < 1"), "model.num_negatives": _POSITIVE,
    "model.cand_rank_weight": _NON_NEGATIVE, "model.n_hosts": _NON_NEGATIVE,
    "train.batch_size": _POSITIVE, "train.lr": _number(lambda v: v > 0, "> 0"), "train.weight_decay": _NON_NEGATIVE,
    "train.max_epochs": _POSITIVE, "train.patience": _POSITIVE, "train.num_processes": _POSITIVE,
    "train.grad_clip": _NON_NEGATIVE, "train.reader_workers": _POSITIVE, "train.shuffle_buffer": _NON_NEGATIVE,
    "train.eval_negatives": _POSITIVE, "train.eval_k": _POSITIVE, "train.max_steps_per_epoch": _POSITIVE,
    "train.cpu_threads": _POSITIVE,
    "evaluate.intent_threshold": _FRACTION, "evaluate.als_rank": _POSITIVE, "evaluate.als_max_iter": _POSITIVE,
    "gate.auc_tolerance": _NON_NEGATIVE,
    "score.top_k": _POSITIVE, "score.active_days": _POSITIVE, "score.batch_size": _POSITIVE,
}


def _check_range(key: str, value: Any, origin: str) -> None:
    """ConfigError if `value` is outside the range RANGES gives `key` (None: an unset optional)."""
    if key not in RANGES or value is None:
        return
    check, wanted = RANGES[key]
    if not check(value):
        raise ConfigError(f"config key {key!r} ({origin}): expected {wanted}, got {value!r}")


def _set_checked(data: dict[str, Any], schema: Mapping[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    node_schema: Any = schema
    node = data
    for i, part in enumerate(parts):
        prefix = ".".join(parts[: i + 1])
        if ".".join(parts[:i]) in _FREE_FORM:
            node[part] = value
            return
        if not isinstance(node_schema, Mapping) or part not in node_schema:
            known = ", ".join(sorted(node_schema)) if isinstance(node_schema, Mapping) else "none"
            raise ConfigError(f"unknown config key {prefix!r} ({origin}); known keys here: {known}")
        if i == len(parts) - 1:
            node[part] = _coerce(prefix, node_schema[part], value, origin)
            return
        node_schema = node_schema[part]
        node = node.setdefault(part, {})


def _flatten(layer: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Dotted (key, value) pairs of a YAML layer; free-form sections stay whole."""
    for k, v in layer.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in _FREE_FORM:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def load_config(
    conf_path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge default file, --conf file, STREAMRANK_* env vars and --set overrides, validated."""
    schema = _load_yaml(DEFAULT_CONF)
    data = copy.deepcopy(schema)
    source = str(DEFAULT_CONF)
    if conf_path is not None and Path(conf_path).resolve() != DEFAULT_CONF:
        for key, value in _flatten(_load_yaml(Path(conf_path))):
            _set_checked(data, schema, key, value, origin=f"file {conf_path}")
        source = str(conf_path)
    env = os.environ if env is None else env
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".")
        _set_checked(data, schema, key, value, origin=f"env {name}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set spark.master=local[2]")
        key, value = item.split("=", 1)
        _set_checked(data, schema, key.strip(), value, origin=f"--set {key.strip()}")
    _check_choices(data)
    return Config(data, source)


#: Settings whose value is one of a few words.
CHOICES = {"delta.engine": ("auto", "spark", "rs"), "score.precision": ("auto", "fp32", "bf16")}


def _check_choices(data: Mapping[str, Any]) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = data[section][name]
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: expected one of {', '.join(allowed)}, got {value!r}")
