"""The data-quality gate: expectation suites (data files) validated by Great Expectations on Spark.

Suites live in schemas/expectations/<name>.json so analysts can read and review what a
stage promises without reading code (DESIGN section 1). Each expectation carries a
severity: a failed `critical` one stops the stage before it publishes (exit 3, DESIGN
section 9), a failed `warning` one is recorded in ops/dq_results and the data docs but
lets the night go on. Thresholds that depend on configuration or history (the maximum
quarantine ratio, the trailing 7-day volume band) are GX `{"$PARAMETER": "name"}`
references that the stage fills at validation time, so the suite files stay static.

The whole suite is one `batch.validate(suite)` call, so GX plans all metrics together
and Spark runs few jobs over the frame (the clean and score stages pass their staged
files, so the gate reads what it would publish); only when column checks fail does a
second, smaller call fetch samples of the offending values for just those checks. The
result is stored in a file-backed GX project under `<docs_root>/../gx` (never in the
repository) and the data docs site under `docs_root` is rebuilt incrementally for the
stage's results (one build, `validate_all`), so the operator can open the exact page a
failed gate points to straight from disk. (GX's pages take their CSS/JS from public CDNs: offline they are unstyled but
complete, and the index gets a plain list of pages for that case.)

Great Expectations is imported lazily: it costs seconds to import, and most CLI
commands never validate anything.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from streamrank.errors import ConfigError, QualityGateError
from streamrank.schemas import SCHEMA_DIR

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

# No usage statistics, ever: the nightly runs on machines without internet access, and a
# data tool must not phone home. Set before great_expectations is first imported.
os.environ["GX_ANALYTICS_ENABLED"] = "False"

log = logging.getLogger(__name__)

SUITE_DIR = SCHEMA_DIR / "expectations"
SEVERITIES = ("critical", "warning")
DATASOURCE_NAME = "streamrank_spark"
PANDAS_DATASOURCE_NAME = "streamrank_pandas"  # small frames a stage builds in Python
BATCH_DEFINITION_NAME = "whole_dataframe"
SITE_NAME = "streamrank"
# Pass 1 asks GX for unexpected counts only: a sample of offending values costs one more
# Spark scan per column check (on 1M cached rows: 33 jobs and ~2.9 s instead of 7 jobs
# and ~1.5 s), and on a good night nobody reads it. Pass 2 re-runs just the failed
# column checks with a sample, because on a bad night the sample is what says *why*.
RESULT_FORMAT: dict[str, Any] = {"result_format": "BASIC", "partial_unexpected_count": 0}
SAMPLE_FORMAT: dict[str, Any] = {"result_format": "BASIC", "partial_unexpected_count": 10}
# Validation results listed on the data-docs index: about a month of nights (clean and
# score validate two suites each). GX reads back every listed result on each build, so
# the limit bounds what a stage pays for its index: 0.85 s per build with 258 results
# (cProfile of bench_clean on the 2-core VM, ~3 ms a result). Older pages stay on disk,
# and every result stays queryable in ops/dq_results.
INDEX_LIMIT = 120
_ENTRY_KEYS = {"type", "kwargs", "severity", "notes"}
_SUITE_KEYS = {"name", "description", "expectations"}
_ORDER_META = "streamrank_index"
_PARAM = "$PARAMETER"
_RUN_NAME_RE = re.compile(r"[^A-Za-z0-9._=-]+")
# GX's page header loads its logo from an S3 bucket with the context id appended, i.e.
# a tracking pixel fired whenever someone opens the docs; pages are rewritten to use the
# copy of the logo GX already ships into <site>/static/images.
_REMOTE_LOGO_RE = re.compile(r"https://great-expectations-web-assets\.s3[^\"'\s]*?\.png[^\"'\s]*")
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, flattened for ops/dq_results and for the gate message."""

    suite: str
    expectation: str  # e.g. "expect_column_values_to_not_be_null(column=event_id)"
    column: str | None
    severity: str
    success: bool
    observed_value: str
    details: str


@dataclass(frozen=True)
class ValidationReport:
    """All outcomes of one suite on one frame, and the data-docs page that shows them."""

    suite: str
    outcomes: list[ExpectationOutcome]
    data_docs: str  # file:// URI of this validation's page ("" if it could not be built)

    @property
    def critical_failures(self) -> list[ExpectationOutcome]:
        """Failed critical expectations: any of these must stop the stage."""
        return [o for o in self.outcomes if o.severity == "critical" and not o.success]

    @property
    def warnings_failed(self) -> list[ExpectationOutcome]:
        """Failed warning expectations: recorded and reported, but not blocking."""
        return [o for o in self.outcomes if o.severity == "warning" and not o.success]

    @property
    def passed(self) -> bool:
        """The gate passes when no critical expectation failed."""
        return not self.critical_failures

    @property
    def data_docs_path(self) -> Path | None:
        """The page as a local path, for code that opens or copies it."""
        return _uri_to_path(self.data_docs) if self.data_docs else None

    def summary(self) -> str:
        """One line for the stage's log: counts, not details."""
        n_ok = sum(o.success for o in self.outcomes)
        return (
            f"{self.suite}: {n_ok}/{len(self.outcomes)} expectations met, "
            f"{len(self.critical_failures)} critical failed, {len(self.warnings_failed)} warnings"
        )

    def rows(self, run_id: str, stage: str, run_date: dt.date) -> list[dict[str, Any]]:
        """Rows for ops/dq_results (schemas/tables/ops_dq_results.json), one per expectation.

        Every expectation is recorded, passed or not, so an analyst can chart a check's
        observed value over time and see when it started to drift.
        """
        recorded_at = dt.datetime.now(dt.UTC)
        return [
            {
                "run_id": run_id,
                "stage": stage,
                "suite": o.suite,
                "expectation": o.expectation,
                "column": o.column,
                "severity": o.severity,
                "success": bool(o.success),
                "observed_value": o.observed_value,
                "details": o.details,
                "data_docs": self.data_docs,
                "recorded_at": recorded_at,
                "run_date": run_date,
            }
            for o in self.outcomes
        ]


# --------------------------------------------------------------------------- suites


def suite_path(name: str, suite_dir: Path | None = None) -> Path:
    """Where suite `name` lives: schemas/expectations/<name>.json unless a directory is given."""
    return (suite_dir or SUITE_DIR) / f"{name}.json"


def load_suite(name: str, suite_dir: Path | None = None) -> dict[str, Any]:
    """Read and check schemas/expectations/<name>.json.

    A malformed suite is a ConfigError (exit 2) naming the file and the entry, raised
    before any data is touched: a typo in a severity or an expectation type must never
    silently turn a gate off.
    """
    path = suite_path(name, suite_dir)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.json"))) or "none"
        raise ConfigError(f"unknown expectation suite {name!r}: no file {path}; known suites: {known}")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object with name, description, expectations")
    unknown = set(doc) - _SUITE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_SUITE_KEYS)}")
    if doc.get("name") != name:
        raise ConfigError(f"{path}: 'name' must be {name!r} (the file name), got {doc.get('name')!r}")
    entries = doc.get("expectations")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'expectations' must be a non-empty list")
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        _check_entry(path, i, entry)
        label = expectation_label(entry["type"], entry["kwargs"])
        if label in seen:
            raise ConfigError(f"{path}: expectations[{i}] repeats expectations[{seen[label]}] ({label})")
        seen[label] = i
    return doc


def _check_entry(path: Path, i: int, entry: Any) -> None:
    """Validate one suite entry's shape, severity, type and kwargs against GX itself."""
    where = f"{path}: expectations[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object with type, kwargs, severity, notes")
    etype = entry.get("type")
    where = f"{where} ({etype})"
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
    if entry.get("severity") not in SEVERITIES:
        raise ConfigError(
            f"{where}: unknown severity {entry.get('severity')!r}; expected one of {', '.join(SEVERITIES)}"
        )
    if not isinstance(entry.get("kwargs"), dict):
        raise ConfigError(f"{where}: 'kwargs' must be an object")
    if not isinstance(entry.get("notes", ""), str):
        raise ConfigError(f"{where}: 'notes' must be a string saying why the check matters")
    if not isinstance(etype, str):
        raise ConfigError(f"{where}: 'type' must be an expectation type such as expect_column_values_to_not_be_null")
    _gx()
    from great_expectations.expectations.registry import get_expectation_impl

    try:
        get_expectation_impl(etype)
    except Exception:  # noqa: BLE001 - GX raises its own ExpectationNotFoundError
        raise ConfigError(f"{where}: unknown expectation type {etype!r}") from None
    try:
        _to_expectation(entry, index=i)
    except Exception as exc:  # noqa: BLE001 - pydantic/GX validation errors vary by type
        first = str(exc).strip().splitlines()
        raise ConfigError(f"{where}: invalid kwargs {entry['kwargs']}: {' '.join(first[:4])}") from None


def parameter_names(suite: dict[str, Any]) -> set[str]:
    """Names of the `{"$PARAMETER": name}` references a suite needs filled at run time."""
    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if _PARAM in value:
                names.add(str(value[_PARAM]))
            else:
                for v in value.values():
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for entry in suite["expectations"]:
        walk(entry["kwargs"])
    return names


def expectation_label(etype: str, kwargs: dict[str, Any]) -> str:
    """A stable, readable name: `type(k=v, ...)`, parameters shown as `$name`.

    It is the key analysts group ops/dq_results by across nights, so it uses the suite's
    kwargs (not the resolved values, which change with the trailing volume band).
    """
    parts = [f"{k}={_fmt_kwarg(v)}" for k, v in kwargs.items() if k != "batch_id"]
    return f"{etype}({', '.join(parts)})"


def _fmt_kwarg(value: Any) -> str:
    if isinstance(value, dict) and _PARAM in value:
        return f"${value[_PARAM]}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_kwarg(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def _entry_column(kwargs: dict[str, Any]) -> str | None:
    """The column(s) an expectation is about, comma-joined for multi-column checks."""
    if isinstance(kwargs.get("column"), str):
        return kwargs["column"]
    if isinstance(kwargs.get("column_list"), list):
        return ",".join(str(c) for c in kwargs["column_list"])
    if "column_A" in kwargs and "column_B" in kwargs:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    return None


def _to_expectation(entry: dict[str, Any], index: int, description: str | None = None) -> Any:
    """Build the GX Expectation object for one suite entry (type string + kwargs)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    config = ExpectationConfiguration(
        type=entry["type"],
        kwargs=dict(entry["kwargs"]),
        meta={_ORDER_META: index},
        notes=entry.get("notes") or None,
        description=description,
        severity=entry["severity"],
    )
    return config.to_domain_obj()


# ------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class Check:
    """One suite to run on one frame: what `validate_all` takes, in the order given."""

    df: Any  # a Spark DataFrame (cached by the caller), a small pandas DataFrame, or a function returning one
    suite: str
    parameters: dict[str, Any] | None = None

    def frame(self) -> Any:
        """The frame to validate. A function is called only when its suite's turn comes, so a
        stage can list first a check that is ready now and then one whose files are still
        being written (clean validates its day summary while silver's staged write runs)."""
        return self.df() if callable(self.df) else self.df


def validate(
    df: DataFrame,
    suite_name: str,
    docs_root: Path,
    run_name: str,
    parameters: dict[str, Any] | None = None,
) -> ValidationReport:
    """Validate `df` against suite `suite_name` and publish the result to the data docs.

    `df` is a Spark frame, which the caller caches first (GX runs a handful of Spark
    jobs over it), or a small pandas frame, which GX checks in Python. `parameters`
    fills the suite's `$PARAMETER` references; a missing one is a ConfigError, because a
    suite whose threshold is unknown cannot say whether the data is good. Extra
    parameters are ignored so a stage can pass one dict to several suites.
    """
    return validate_all([Check(df, suite_name, parameters)], docs_root, run_name)[0]


def validate_all(checks: Sequence[Check], docs_root: Path, run_name: str) -> list[ValidationReport]:
    """`validate` for several suites of one stage run, with ONE data-docs build at the end.

    Why one build: GX rebuilds the site index on every build, reading back every listed
    validation result, which cost more than rendering the result pages themselves
    (cProfile of bench_clean); a stage that checks two frames pays it once.
    """
    prepared = [(c, *_suite_and_parameters(c)) for c in checks]  # every ConfigError before any Spark work
    docs_root = Path(docs_root).resolve()
    with _LOCK, _quiet():
        context = _context(docs_root)
        done = [_run_suite(context, c, suite_doc, params) for c, suite_doc, params in prepared]
        pages = _publish(context, done, run_name, docs_root)
    reports = []
    for (suite, _, _, outcomes, elapsed), page in zip(done, pages, strict=True):
        report = ValidationReport(suite=suite.name, outcomes=outcomes, data_docs=page)
        log.info("%s (%.1fs) data docs: %s", report.summary(), elapsed, page or "not built")
        for o in report.warnings_failed:
            log.warning("quality warning %s: %s %s", o.expectation, o.observed_value, o.details)
        reports.append(report)
    return reports


def _suite_and_parameters(check: Check) -> tuple[dict[str, Any], dict[str, Any]]:
    """The check's suite file and its JSON-ready parameters; ConfigError if one is missing."""
    suite_doc = load_suite(check.suite)
    params = {k: _json_value(k, v) for k, v in (check.parameters or {}).items()}
    missing = parameter_names(suite_doc) - set(params)
    if missing:
        raise ConfigError(
            f"suite {check.suite!r} needs parameter(s) {sorted(missing)} at validation time; "
            f"got {sorted(params) or 'none'}"
        )
    return suite_doc, params


def _run_suite(context: Any, check: Check, suite_doc: dict[str, Any], params: dict[str, Any]
               ) -> tuple[Any, Any, dict[str, Any], list[ExpectationOutcome], float]:
    """Run one suite on its frame: (GX suite, GX result, parameters, outcomes, seconds)."""
    suite_name = check.suite
    gx = _gx()
    df = check.frame()
    batch = _batch_definition(context, suite_name, pandas=_is_pandas(df)).get_batch(batch_parameters={"dataframe": df})
    entries = list(enumerate(suite_doc["expectations"]))
    started = time.perf_counter()
    # One batch.validate for the whole suite: GX plans all metrics together and
    # bundles the aggregates into a few Spark jobs.
    suite = _gx_suite(gx, suite_name, entries, params)
    result = batch.validate(suite, result_format=RESULT_FORMAT, expectation_parameters=params or None)
    failed = {_result_index(r) for r in result.results if not r.success and "unexpected_count" in (r.result or {})}
    if failed:
        sampled = batch.validate(
            _gx_suite(gx, suite_name, [(i, e) for i, e in entries if i in failed], params),
            result_format=SAMPLE_FORMAT, expectation_parameters=params or None,
        )
        by_index = {_result_index(r): r for r in sampled.results}
        result.results = [by_index.get(_result_index(r), r) for r in result.results]
    outcomes = _outcomes(suite_name, suite_doc, result, params)
    return suite, result, params, outcomes, time.perf_counter() - started


def raise_on_critical(report: ValidationReport) -> None:
    """Stop the stage (QualityGateError, exit 3) if any critical expectation failed.

    The message names every failed critical expectation with its observed value, and the
    error carries the data-docs page, so the operator knows what broke and where to look.
    """
    failed = report.critical_failures
    if not failed:
        return
    lines = [f"quality gate failed: suite {report.suite}: {len(failed)} critical expectation(s) not met"]
    for o in failed:
        lines.append(f"  - {o.expectation}: observed {o.observed_value}" + (f" ({o.details})" if o.details else ""))
    raise QualityGateError("\n".join(lines), data_docs=report.data_docs or None)


# --------------------------------------------------------------------------- helpers


def _gx() -> Any:
    """Import great_expectations once, with its loggers turned down to errors."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    _skip_empty_samples()
    return gx


def _skip_empty_samples() -> None:
    """Make GX's column map expectations skip the sample of unexpected values when it is empty.

    Why: pass 1 asks for partial_unexpected_count 0, yet GX 1.x still plans the
    `<metric>.unexpected_values` metric for every column map expectation, and on Spark
    each is a filter + limit(0) query. No job runs, but each plan is built over py4j on
    the driver while the cores sit idle: the 16 column checks of the silver suite made
    2,725 py4j calls instead of 1,412 and spent 0.50-0.63 s in those queries (cProfile,
    scale-1 silver). Alternating 6 runs each, the suite took 2.21 s against 2.38 s and
    2.61 s against 2.91 s (medians). Installed once, on GX's base class, and only drops
    that metric when no values were asked for (BASIC or SUMMARY with a sample of 0):
    counts (what pass 1 reports), pass 2's samples and COMPLETE's lists are computed as before.
    """
    from great_expectations.expectations.expectation import ColumnMapExpectation

    original = ColumnMapExpectation.get_validation_dependencies
    if getattr(original, "_streamrank_skips_empty_samples", False):
        return

    def get_validation_dependencies(self: Any, execution_engine: Any = None, runtime_configuration: Any = None) -> Any:
        deps = original(self, execution_engine, runtime_configuration)
        sample = f"{self.map_metric}.unexpected_values"
        fmt = deps.result_format  # COMPLETE lists every unexpected value, whatever the sample size
        wanted = fmt.get("partial_unexpected_count") != 0 or fmt.get("result_format") not in ("BASIC", "SUMMARY")
        if not wanted and deps.get_metric_configuration(sample) is not None:
            deps.remove_metric_configuration(sample)
        return deps

    get_validation_dependencies._streamrank_skips_empty_samples = True  # type: ignore[attr-defined]
    ColumnMapExpectation.get_validation_dependencies = get_validation_dependencies


class _quiet(warnings.catch_warnings):
    """Silence GX's deprecation/user warnings for one validation; they are not actionable here."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.simplefilter("ignore")


def _gx_suite(gx: Any, name: str, entries: list[tuple[int, dict[str, Any]]], params: dict[str, Any]) -> Any:
    """An in-memory GX suite of the given (index, entry) pairs; the index rides along in meta.

    The expectations go in through the constructor, not add_expectation: that one compares
    each new expectation with every earlier one as pydantic dicts, 0.7 s for the two clean
    suites (cProfile of bench_clean), to catch repeats that load_suite already rejects.
    """
    return gx.ExpectationSuite(name=name, expectations=[_to_expectation(e, i, _description(e, params)) for i, e in entries])


def _result_index(r: Any) -> int:
    """The suite-file position of a GX result (GX returns results grouped by column)."""
    return int((r.expectation_config.meta or {})[_ORDER_META])


def _json_value(name: str, value: Any) -> Any:
    """Parameters end up in the stored JSON result: plain numbers, strings, booleans or None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"quality parameter {name!r}: expected a number or string, got {value!r}") from None
    if math.isnan(number):
        raise ConfigError(f"quality parameter {name!r} is NaN; pass a number or leave the check out")
    return number


def _context(docs_root: Path) -> Any:
    """A file-backed GX context under <docs_root>/../gx whose only docs site is docs_root.

    File-backed, so validation results accumulate and the site index lists every night,
    not just the last one. Configuration is only rewritten when it differs, so the
    project file stays stable across runs.
    """
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    project_root = docs_root.parent
    project_root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(project_root))
    changed = False
    if context.variables.analytics_enabled is not False:
        context.variables.analytics_enabled = False
        changed = True
    bars = context.variables.progress_bars
    if bars is None or bars.get("globally", True) or bars.get("metric_calculations", True):
        # tqdm bars ("Calculating Metrics") are noise in a nightly log.
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        changed = True
    if changed:
        context.variables.save()
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            # Relative to the gx project, so a warehouse can be moved or copied whole.
            "base_directory": os.path.relpath(docs_root, context.root_directory),
        },
        # GX reads every listed result to draw the index; bound it so a year of nights
        # does not make each build slower. Older pages stay on disk.
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "validation_results_limit": INDEX_LIMIT},
    }
    sites = context.list_data_docs_sites()
    for other in [s for s in sites if s != SITE_NAME]:
        context.delete_data_docs_site(other)  # GX's default local_site would duplicate every page
    if SITE_NAME not in sites:
        context.add_data_docs_site(SITE_NAME, site)
    elif sites[SITE_NAME] != site:
        context.update_data_docs_site(SITE_NAME, site)
    return context


def _is_pandas(df: Any) -> bool:
    import pandas as pd

    return isinstance(df, pd.DataFrame)


def _batch_definition(context: Any, suite_name: str, pandas: bool = False) -> Any:
    """The whole-dataframe batch definition of the asset named after the suite.

    persist=False: the stage has already cached the frame and owns its lifetime; GX's
    default would persist it again and never unpersist. Pandas frames get their own
    data source, as GX binds an asset to one engine.
    """
    name = PANDAS_DATASOURCE_NAME if pandas else DATASOURCE_NAME
    try:
        source = context.data_sources.get(name)
    except Exception:  # noqa: BLE001 - GX raises a KeyError subclass or its own error
        source = context.data_sources.add_pandas(name=name) if pandas else context.data_sources.add_spark(name=name, persist=False)
    try:
        asset = source.get_asset(suite_name)
    except LookupError:
        asset = source.add_dataframe_asset(name=suite_name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION_NAME)
    except (KeyError, LookupError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)


def _description(entry: dict[str, Any], params: dict[str, Any]) -> str:
    """What the data docs show for an expectation: severity, stable label, resolved parameters, why.

    GX's own prose ("values must never be null") omits the expectation name and severity,
    which are what the gate message and ops/dq_results refer to.
    """
    label = expectation_label(entry["type"], entry["kwargs"])
    used = _used_parameters(entry["kwargs"], params)
    text = f"[{entry['severity']}] {label}"
    if used:
        text += " with " + ", ".join(f"{k}={v}" for k, v in used.items())
    if entry.get("notes"):
        text += f" - {entry['notes']}"
    return text


def _used_parameters(kwargs: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {
        v[_PARAM]: params.get(v[_PARAM]) for v in kwargs.values() if isinstance(v, dict) and _PARAM in v
    }


def _outcomes(
    suite_name: str, suite_doc: dict[str, Any], result: Any, params: dict[str, Any]
) -> list[ExpectationOutcome]:
    """One outcome per suite entry, in suite order (GX returns results grouped by column)."""
    by_index = {_result_index(r): r for r in result.results}
    outcomes = []
    for i, entry in enumerate(suite_doc["expectations"]):
        label = expectation_label(entry["type"], entry["kwargs"])
        r = by_index.get(i)
        if r is None:  # defensive: GX dropped an expectation; count it as failed, loudly
            outcomes.append(
                ExpectationOutcome(suite_name, label, _entry_column(entry["kwargs"]), entry["severity"],
                                   False, "not evaluated", "GX returned no result for this expectation")
            )
            continue
        observed, details = _describe_result(entry, r, params)
        outcomes.append(
            ExpectationOutcome(
                suite=suite_name,
                expectation=label,
                column=_entry_column(entry["kwargs"]),
                severity=entry["severity"],
                success=bool(r.success),
                observed_value=observed,
                details=details,
            )
        )
    return outcomes


def _exception_message(r: Any) -> str | None:
    """GX reports errors either flat or keyed by metric; return the first message, if any."""
    info = r.exception_info or {}
    candidates = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for c in candidates:
        if c.get("raised_exception"):
            message = str(c.get("exception_message") or "exception during validation")
            return message.strip().splitlines()[0][:500]
    return None


def _describe_result(entry: dict[str, Any], r: Any, params: dict[str, Any]) -> tuple[str, str]:
    """(observed_value, details) strings for ops/dq_results and the gate message."""
    details: list[str] = []
    used = _used_parameters(entry["kwargs"], params)
    if used:
        details.append(", ".join(f"{k}={v}" for k, v in used.items()))
    error = _exception_message(r)
    if error is not None:
        details.append(error)
        return "error", "; ".join(details)
    res = r.result or {}
    if "unexpected_count" in res:
        observed = f"unexpected_count={res['unexpected_count']} of {res.get('element_count')}"
        if res.get("missing_count"):
            observed += f" (missing={res['missing_count']})"
        if "mostly" in entry["kwargs"]:
            details.append(f"mostly={_fmt_kwarg(entry['kwargs']['mostly'])}")
        sample = res.get("partial_unexpected_list") or []
        if sample and not r.success:
            shown = ", ".join(_fmt_value(v) for v in sample[:5])
            details.append(f"e.g. {shown}")
    else:
        observed = _fmt_value(res.get("observed_value"))
    return observed, "; ".join(details)


def _fmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, sort_keys=True)[:500]
    return str(value)[:200]


def _publish(context: Any, done: Sequence[tuple[Any, Any, dict[str, Any], list[ExpectationOutcome], float]],
             run_name: str, docs_root: Path) -> list[str]:
    """Store the suites and results, build their pages and the index once, return each result page's URI.

    The suites are stored too so the index's and the pages' links to them resolve. Data
    docs are a view, not the gate: if GX fails to render, a minimal page with the same
    outcomes is written for each result instead, so the gate still points somewhere useful.
    """
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    run_time = dt.datetime.now(dt.UTC)
    safe_run = _RUN_NAME_RE.sub("_", run_name).strip("_") or "run"
    run_id = RunIdentifier(run_name=safe_run, run_time=run_time)
    keys = []
    try:
        for suite, result, params, _, _ in done:
            result.meta["run_id"] = run_id
            result.meta["validation_time"] = run_time
            result.meta["streamrank_parameters"] = dict(params)
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite.name),
                run_id=run_id,
                batch_identifier=result.batch_id or f"{DATASOURCE_NAME}-{suite.name}",
            )
            context.suites.add_or_update(suite)
            context.validation_results_store.store_validation_results(result, key)
            keys.append(key)
        suite_ids = [ExpectationSuiteIdentifier(name=n) for n in dict.fromkeys(suite.name for suite, *_ in done)]
        context.build_data_docs(site_names=[SITE_NAME], resource_identifiers=[*keys, *suite_ids])
        pages = []
        for key in keys:
            urls = context.get_docs_sites_urls(resource_identifier=key, site_name=SITE_NAME, only_if_exists=False)
            page = _uri_to_path(urls[0]["site_url"]) if urls and urls[0].get("site_url") else None
            if page is None or not page.exists():
                raise FileNotFoundError(f"GX reported {urls}, but no page exists there")
            _localise(page, docs_root)
            pages.append(page)
        for suite_id in suite_ids:
            _localise(docs_root / "expectations" / f"{suite_id.name}.html", docs_root)
        _localise(docs_root / "index.html", docs_root)
        _add_offline_index(docs_root / "index.html")
    except Exception as exc:  # noqa: BLE001 - rendering must never hide the validation outcome
        log.warning("GX data docs could not be built (%s); writing a plain page instead", exc)
        pages = [_fallback_page(docs_root, suite.name, safe_run, run_time, outcomes) for suite, _, _, outcomes, _ in done]
    return [page.resolve().as_uri() for page in pages]


def _localise(page: Path, docs_root: Path) -> None:
    """Point the page's GX logo at the local static copy instead of GX's tracking URL."""
    if not page.exists():
        return
    text = page.read_text(encoding="utf-8")
    logo = os.path.relpath(docs_root / "static" / "images" / "logo-long.png", page.parent)
    new = _REMOTE_LOGO_RE.sub(logo.replace(os.sep, "/"), text)
    if new != text:
        page.write_text(new, encoding="utf-8")


_INDEX_ROW_RE = re.compile(
    r"'run_time': '(?P<time>[^']*)'.*?'run_name': '(?P<run>[^']*)'.*?"
    r"'_expectation_suite_name_sort': '(?P<suite>[^']*)'.*?'_table_row_link_path': '(?P<path>[^']*)'.*?"
    r"'_validation_success_text': '(?P<status>[^']*)'",
    re.S,
)
_OFFLINE_START, _OFFLINE_END = "<!-- streamrank-offline-index -->", "<!-- /streamrank-offline-index -->"


def _add_offline_index(index: Path) -> None:
    """Add a plain list of validation pages to GX's index.html.

    GX's index table is drawn by jQuery/bootstrap-table loaded from public CDNs, so on a
    machine without internet access the index is empty. The list is hidden again when
    those scripts did load.
    """
    if not index.exists():
        return
    text = index.read_text(encoding="utf-8")
    start, end = text.find(_OFFLINE_START), text.find(_OFFLINE_END)
    if start != -1 and end != -1:
        text = text[:start] + text[end + len(_OFFLINE_END):]
    items = [
        f'<li>{html.escape(m["status"])} - <a href="{html.escape(m["path"])}">{html.escape(m["suite"])} / '
        f"{html.escape(m['run'])} / {html.escape(m['time'])}</a></li>"
        for m in _INDEX_ROW_RE.finditer(text)
    ]
    if not items or "</body>" not in text:
        return
    block = (
        f'{_OFFLINE_START}<div id="streamrank-offline-index" style="margin:1em">'
        f"<h3>Validation results</h3><ul>{''.join(items)}</ul></div>"
        "<script>if (window.jQuery) {document.getElementById('streamrank-offline-index').style.display='none';}</script>"
        f"{_OFFLINE_END}"
    )
    index.write_text(text.replace("</body>", block + "</body>", 1), encoding="utf-8")


def _fallback_page(
    docs_root: Path, suite_name: str, run_name: str, run_time: dt.datetime, outcomes: list[ExpectationOutcome]
) -> Path:
    """A dependency-free HTML page listing the outcomes, used when GX rendering fails."""
    stamp = run_time.strftime("%Y%m%dT%H%M%S.%fZ")
    page = docs_root / "validations" / suite_name / run_name / stamp / "streamrank-fallback.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(
        f"<tr><td>{'ok' if o.success else 'FAILED'}</td><td>{html.escape(o.severity)}</td>"
        f"<td>{html.escape(o.expectation)}</td><td>{html.escape(o.observed_value)}</td>"
        f"<td>{html.escape(o.details)}</td></tr>"
        for o in outcomes
    )
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(suite_name)}</title></head>"
        f"<body><h1>{html.escape(suite_name)} - {html.escape(run_name)}</h1><table border='1'>"
        f"<tr><th>status</th><th>severity</th><th>expectation</th><th>observed</th><th>details</th></tr>"
        f"{rows}</table></body></html>",
        encoding="utf-8",
    )
    return page


def _uri_to_path(uri: str) -> Path:
    """file:// URI (GX's, possibly with '..' segments) to a resolved local path."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme == "file" else uri).resolve()


def raise_on_critical_all(reports: Sequence[ValidationReport]) -> None:
    """One QualityGateError naming the failed critical checks of every suite a stage validated,
    so an operator sees all of them at once instead of fixing one per re-run."""
    errors: list[QualityGateError] = []
    for report in reports:
        try:
            raise_on_critical(report)
        except QualityGateError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise QualityGateError("\n".join(str(e) for e in errors), data_docs=errors[0].data_docs)


def record_and_gate(reports: Sequence[ValidationReport], dq_table: Any, run_id: str, stage: str,
                    run_date: dt.date) -> None:
    """What every gated stage does after validating: store every result in ops/dq_results
    (history, whether or not the gate passes), print failed warnings, then stop on any
    critical failure (exit 3) naming all of them."""
    dq_table.append_rows([row for r in reports for row in r.rows(run_id, stage, run_date)])
    for report in reports:
        for o in report.warnings_failed:
            print(f"[{stage}] quality warning: {report.suite}: {o.expectation} observed {o.observed_value}", flush=True)
    raise_on_critical_all(reports)

