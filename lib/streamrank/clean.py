"""Clean stage: bronze/viewer_events of ingest date D -> silver/viewer_events + silver/quarantine.

Every bronze row of D ends in exactly one of three places, and the stage proves it before
it publishes (DESIGN section 9, "conserving"):

- quarantine: the row has at least one reason code (all codes that apply are kept);
- duplicate: the row is valid but its event_id is already in silver from another
  ingest date within clean.dedup_lookback_days of D (before it: a replay; after it: a
  backfill of a skipped day meets the replays of it that later days already published),
  or it is not the first valid copy of its event_id today -- dropped and counted, never
  stored twice;
- silver: everything else, typed, with ip/device_id/comment_text dropped (data
  minimisation) and has_comment/comment_length derived in their place.

Precedence, and why: reasons are evaluated first, on every row; only rows without a
reason take part in deduplication. So an exact copy of a broken line is quarantined
(with the same reasons as its original) rather than counted as a duplicate, and a
duplicate never hides a fault. Each generator fault kind therefore maps to exactly one
outcome, and the ledger's counts can be checked 1:1 (tests/integration/test_clean.py).

Reason codes (REASONS). Field checks only run on rows whose line parsed as JSON: the
fields of a truncated line are a symptom of its one fault, not independent faults.

==================  =====================================================================
malformed           bronze parse_ok is false (the line is not a JSON object)
bad_encoding        the raw line holds U+FFFD (invalid UTF-8 replaced when it was read)
bad_type            dwell_ms/price_paid/quantity present but not a number of the column's
                    type, event_ts present but not ISO 8601 with an offset, or a text
                    field of silver (TEXT_FIELDS) holding a JSON object or array
missing_field       a required field is null: event_id, viewer_id, session_id, stream_id,
                    event_type, event_ts (the silver suite's non-null contract)
unknown_event_type  event_type not one of the ten of DESIGN section 5
bad_dwell           dwell_ms < 0 or > clean.max_dwell_ms
bad_price           price_paid < 0, > clean.max_price, NaN or infinite
bad_quantity        quantity < 1 or > clean.max_quantity
future_ts           event_ts after the end of D + clean.future_tolerance_hours
past_ts             event_ts before the start of D - clean.max_lateness_days
unknown_product     product_id set but not in the bronze/products snapshot of D
unknown_stream      stream_id not in bronze/streams of D or D-1 (late events reference
                    yesterday's streams)
bot                 the viewer has > clean.bot_max_events_per_minute events in some 60 s
                    window, or > clean.bot_max_purchases_per_hour purchases in some hour,
                    within this ingest day: every row of that viewer that day gets it
==================  =====================================================================

Generator ledger kind -> outcome: see LEDGER_REASON (dup_within_file and dup_replay ->
duplicates_dropped; empty_files -> no rows at all).

Performance (measured, see tests/benchmarks/bench_clean.py; each Spark job costs, so
the stage is planned around few of them): bronze rows are wide (the raw line is most of
their bytes), so they are never materialised. The labelled frame is built knowing every
row-level reason, minimised (no PII, raw_line kept only on rows with a reason, all
reasons packed into one int bit mask) and materialised once in executor memory
(`materialise`) by the first job over it, the aggregation that finds the few viewers who
may be bots; confirming them reads memory, and the bots' own raw lines are fetched from
bronze during the quarantine write (`bot_lines`), so bronze is scanned once in full. The
dedup plan is one aggregation over the frame, cached and broadcast; the four
conservation counts and the per-reason counts are ONE aggregation. Write, audit,
publish: once the counts conserve, the silver and quarantine files are written (staged,
invisible to readers) in two threads while GX checks the day summary, then GX checks
the staged silver files themselves (the bytes about to be published, read column by
column instead of recomputing the frame); the two commits happen only if every check
passed, otherwise the staged files are deleted. The commits are
journaled (publish.py), so a kill between them is rolled back by the next stage run.
Catalog and schedule ids are read without Spark (delta-rs picks the snapshot partitions'
files, pyarrow reads them) into hash-set lookups instead of broadcast joins, sent to the
JVM as one parsed IN expression (`in_sql`), not one py4j literal per id; the other
per-row expressions are SQL text too, for the same reason (`reason_conditions`). Columns
whose values never repeat are written without Parquet dictionaries (`write_settings`).
Phases are timed with time.perf_counter into run.metrics["phases_s"].
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import deltalake
import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from streamrank.errors import MissingInputError, StreamrankError
from streamrank.publish import publish_staged
from streamrank.spark import session_settings, without_dictionaries

if TYPE_CHECKING:
    from streamrank.config import Config
    from streamrank.context import Context, PhaseTimer, StageRun
    from streamrank.delta import DeltaTable, StagedWrite

log = logging.getLogger(__name__)

STAGE = "clean"
BRONZE = "bronze/viewer_events"
SILVER = "silver/viewer_events"
QUARANTINE = "silver/quarantine"
PRODUCTS = "bronze/products"
STREAMS = "bronze/streams"
SILVER_SUITE = "silver_viewer_events"
SUMMARY_SUITE = "silver_day_summary"

EVENT_TYPES: tuple[str, ...] = (
    "enter_stream", "leave_stream", "view_product", "like", "comment", "share", "gift",
    "click_product", "add_to_cart", "purchase",
)
REQUIRED: tuple[str, ...] = ("event_id", "viewer_id", "session_id", "stream_id", "event_type", "event_ts")
#: landing field -> the silver type it must parse as
NUMERIC: dict[str, str] = {"dwell_ms": "bigint", "price_paid": "double", "quantity": "int"}
#: the landing fields silver keeps as text. Bronze holds every field as text, and a JSON
#: object or array in one arrives as its JSON text ('{"a":1}', '[1]'): no id, event type or
#: app version looks like that, so such a row is bad_type rather than a viewer named '{"a":1}'.
#: (A JSON number or boolean arrives as its digits or word, which is a usable id.)
TEXT_FIELDS: tuple[str, ...] = (
    "event_id", "viewer_id", "session_id", "stream_id", "host_id", "product_id", "event_type", "app_version",
)
#: every reason code, sorted: the order rows' `reasons` arrays come out in
REASONS: tuple[str, ...] = tuple(sorted((
    "malformed", "bad_encoding", "bad_type", "missing_field", "unknown_event_type", "bad_dwell",
    "bad_price", "bad_quantity", "future_ts", "past_ts", "unknown_product", "unknown_stream", "bot",
)))
#: generator fault kind (landing/_ledger/ledger.json) -> the reason code it must produce
LEDGER_REASON: dict[str, str] = {
    "malformed_json": "malformed", "non_utf8": "bad_encoding", "wrong_type": "bad_type",
    "missing_required": "missing_field", "unknown_event_type": "unknown_event_type",
    "bad_dwell": "bad_dwell", "future_ts": "future_ts", "past_ts": "past_ts",
    "unknown_product": "unknown_product", "unknown_stream": "unknown_stream", "bot_events": "bot",
}
#: generator fault kinds that end as duplicates_dropped, not in quarantine
LEDGER_DUPLICATES: tuple[str, ...] = ("dup_within_file", "dup_replay")

# ISO 8601 date-time with an explicit offset: a time without one is ambiguous, so it is
# bad_type rather than silently read as UTC.
_ISO_TS = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)$"
_US_PER_S = 1_000_000
_OUTCOME_SILVER, _OUTCOME_QUARANTINE, _OUTCOME_DUPLICATE = "silver", "quarantine", "duplicate"
_BIT: dict[str, int] = {code: 1 << i for i, code in enumerate(REASONS)}
#: silver and quarantine columns written without a Parquet dictionary (`write_settings`): their
#: values are (nearly) unique per row, and viewer_id, which repeats, keeps its dictionary
NO_DICTIONARY: tuple[str, ...] = ("event_id", "session_id", "event_ts", "line_number", "dwell_ms", "raw_line")


@dataclass(frozen=True)
class CleanRules:
    """The thresholds of the clean.* config section, in one typed object for pure functions."""

    max_lateness_days: int = 3
    future_tolerance_hours: float = 1.0
    dedup_lookback_days: int = 7
    bot_max_events_per_minute: int = 30
    bot_max_purchases_per_hour: int = 20
    max_dwell_ms: int = 86_400_000
    max_quantity: int = 100
    max_price: float = 100_000.0

    @classmethod
    def from_config(cls, cfg: Config) -> CleanRules:
        """Read clean.* with the shipped defaults, so a conf without a key still works."""
        d = cls()
        return cls(**{f: type(getattr(d, f))(cfg.get(f"clean.{f}", getattr(d, f))) for f in d.__dataclass_fields__})


# ------------------------------------------------------------------------------ pure steps

def _utc_micros(day: dt.date, days: float = 0.0, hours: float = 0.0) -> int:
    """Microseconds since the epoch of UTC midnight of `day` shifted: a session-timezone-free bound."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(days=days, hours=hours)
    return int(start.timestamp()) * _US_PER_S


def type_events(bronze: DataFrame) -> DataFrame:
    """Parse the text fields of bronze rows into the silver types, keeping the raw text.

    Adds `_parsed` (the line was a JSON object), `_ts` (UTC timestamp), `_dwell_ms`,
    `_price_paid`, `_quantity` (null where absent or unparseable) and `_us` (event time
    in microseconds). try_cast, not cast: Spark 4 runs in ANSI mode, where one bad value
    in a cast would fail the whole job instead of quarantining one row.
    """
    ts_text = F.col("event_ts")
    ts = F.when(ts_text.rlike(_ISO_TS), ts_text.try_cast("timestamp"))
    return bronze.select(
        *[c for c in bronze.columns if c not in ("ingest_run_id", "ingested_at")],
        F.coalesce(F.col("parse_ok"), F.lit(False)).alias("_parsed"),
        ts.alias("_ts"),
        *[F.col(c).try_cast(t).alias(f"_{c}") for c, t in NUMERIC.items()],
    ).withColumn("_us", F.unix_micros("_ts"))


def in_sql(column: str, values: Collection[str]) -> str:
    """`column IN (values)` as SQL text: null when the column is null, like Column.isin.

    Column.isin sends every value to the JVM as its own literal, one py4j round trip each:
    the ~5,000 catalog and schedule ids of a scale-1 day cost 2.8 s of driver time before
    any Spark job ran (cProfile of bench_clean). One parsed expression costs milliseconds,
    and Spark still turns a long IN list into a hash-set lookup (InSet).
    """
    name = f"`{column.replace('`', '``')}`"
    items = sorted(set(values))
    if not items:
        return f"CASE WHEN {name} IS NOT NULL THEN false END"
    return f"{name} IN ({','.join(_sql_string(v) for v in items)})"


def in_set(column: str, values: Collection[str]) -> Column:
    """`in_sql` as a Column."""
    return F.expr(in_sql(column, values))


def _sql_string(value: str) -> str:
    """A SQL string literal of `value` (quotes and backslashes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def reason_conditions(day: dt.date, rules: CleanRules, product_ids: Collection[str],
                      stream_ids: Collection[str]) -> dict[str, str]:
    """Each row-level reason code -> its condition, as Spark SQL over `type_events` columns.

    SQL text rather than Column objects: every Column call is a py4j round trip (about
    1,700 for these conditions), and parsing one string per condition takes a fraction of
    that driver time, before the stage's first job can start.
    """
    bad_type = " OR ".join([f"({c} IS NOT NULL AND _{c} IS NULL)" for c in NUMERIC]
                           + ["(event_ts IS NOT NULL AND _ts IS NULL)"]
                           # startswith compares bytes in place: a third of the cost of left(c, 1) IN (...)
                           + [f"startswith({c}, '{{') OR startswith({c}, '[')" for c in TEXT_FIELDS])
    missing = " OR ".join(f"{c} IS NULL" for c in REQUIRED)
    future_us = _utc_micros(day, days=1, hours=rules.future_tolerance_hours)
    past_us = _utc_micros(day, days=-rules.max_lateness_days)
    max_price = repr(float(rules.max_price))
    return {
        "malformed": "NOT _parsed",
        "bad_encoding": "contains(raw_line, '\ufffd')",
        "bad_type": f"_parsed AND ({bad_type})",
        "missing_field": f"_parsed AND ({missing})",
        "unknown_event_type": f"_parsed AND event_type IS NOT NULL AND NOT {in_sql('event_type', EVENT_TYPES)}",
        "bad_dwell": f"_parsed AND (_dwell_ms < 0 OR _dwell_ms > {int(rules.max_dwell_ms)})",
        # NaN compares greater than any number in Spark, so it lands here too
        "bad_price": (f"_parsed AND (_price_paid < 0 OR _price_paid > CAST({max_price} AS DOUBLE) OR isnan(_price_paid)"
                      " OR abs(_price_paid) = CAST('Infinity' AS DOUBLE))"),
        "bad_quantity": f"_parsed AND (_quantity < 1 OR _quantity > {int(rules.max_quantity)})",
        "future_ts": f"_parsed AND _us > {future_us}",
        "past_ts": f"_parsed AND _us < {past_us}",
        "unknown_product": f"_parsed AND product_id IS NOT NULL AND NOT {in_sql('product_id', product_ids)}",
        "unknown_stream": f"_parsed AND stream_id IS NOT NULL AND NOT {in_sql('stream_id', stream_ids)}",
    }


def row_reasons(typed: DataFrame, day: dt.date, rules: CleanRules,
                product_ids: Collection[str], stream_ids: Collection[str]) -> DataFrame:
    """Add one boolean `_r_<code>` column per row-level reason, and `_bad` (any of them).

    Known product and stream ids come as Python collections (a catalog snapshot is a
    few thousand ids): Spark turns the IN lists over them into hash-set lookups inside
    the scan, where a broadcast join would cost extra jobs per run. The bot reason is
    viewer-level and added by `with_bots`.
    """
    conds = reason_conditions(day, rules, product_ids, stream_ids)
    flags = [F.expr(f"coalesce({cond}, false)").alias(f"_r_{code}") for code, cond in conds.items()]
    return typed.select("*", *flags).withColumn("_bad", F.expr(" OR ".join(f"_r_{code}" for code in conds)))


def _bot_events(df: DataFrame) -> DataFrame:
    """The events the bot rule counts: parsed rows with a viewer and a valid event time."""
    return df.filter(F.col("_parsed") & F.col("viewer_id").isNotNull() & F.col("_us").isNotNull()).select(
        "viewer_id", "event_id", "_us", F.coalesce(F.col("event_type") == "purchase", F.lit(False)).alias("_buy")
    )


def bot_candidates(typed: DataFrame, rules: CleanRules) -> list[str]:
    """Viewers who MAY be over a bot threshold: a superset of the bots, found by one aggregation.

    A 60 s window overlaps at most two calendar minutes, so a window with more than N
    events has a calendar minute with more than N/2 (pigeonhole); the same holds for
    purchases per hour. One aggregation per viewer-minute returns the busy minutes and
    the minutes with a purchase (rare, so few rows) and the hours are summed here.
    Normal viewers stay far below the bar, so the list is the bots plus few others.
    """
    ne, nb = rules.bot_max_events_per_minute, rules.bot_max_purchases_per_hour
    per_minute = (
        _bot_events(typed)
        .groupBy("viewer_id", F.floor(F.col("_us") / (60 * _US_PER_S)).alias("_m"))
        .agg(F.count("*").alias("_n"), F.count(F.when(F.col("_buy"), 1)).alias("_b"))
        .filter((F.col("_n") * 2 > ne) | (F.col("_b") > 0))
    )
    candidates: set[str] = set()
    buys_per_hour: dict[tuple[str, int], int] = {}
    for r in per_minute.collect():
        if r["_n"] * 2 > ne:
            candidates.add(r["viewer_id"])
        key = (r["viewer_id"], r["_m"] // 60)
        buys_per_hour[key] = buys_per_hour.get(key, 0) + r["_b"]
    candidates |= {viewer for (viewer, _), n in buys_per_hour.items() if n * 2 > nb}
    return sorted(candidates)


def confirm_bots(df: DataFrame, candidates: Sequence[str], rules: CleanRules) -> list[str]:
    """The candidates that really exceed a threshold in a sliding window, sorted.

    Sliding windows (not calendar minutes), so a burst that straddles a minute boundary
    still counts; over distinct events (event_id, time), so a re-delivered file cannot
    turn a normal viewer into a bot. The candidates' events are few: they are counted
    here with two pointers (`sliding_max`) rather than with Spark window sorts.
    """
    if not candidates:
        return []
    ne, nb = rules.bot_max_events_per_minute, rules.bot_max_purchases_per_hour
    events: dict[str, dict[tuple[str | None, int], bool]] = {}
    for r in _bot_events(df).filter(in_set("viewer_id", candidates)).collect():
        events.setdefault(r["viewer_id"], {})[(r["event_id"], r["_us"])] = r["_buy"]
    bots = []
    for viewer, evs in events.items():
        times = sorted(us for _, us in evs)
        buys = sorted(us for (_, us), buy in evs.items() if buy)
        if sliding_max(times, 60 * _US_PER_S) > ne or sliding_max(buys, 3600 * _US_PER_S) > nb:
            bots.append(viewer)
    return sorted(bots)


def find_bots(typed: DataFrame, rules: CleanRules) -> list[str]:
    """Viewers with > bot_max_events_per_minute events in some 60 s window or
    > bot_max_purchases_per_hour purchases in some hour: candidates, then confirmation."""
    return confirm_bots(typed, bot_candidates(typed, rules), rules)


def sliding_max(times_us: Sequence[int], width_us: int) -> int:
    """Most events in any window (t - width, t] of sorted event times (two pointers)."""
    best, lo = 0, 0
    for hi, t in enumerate(times_us):
        while times_us[lo] <= t - width_us:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def minimise(flagged: DataFrame) -> DataFrame:
    """Pack the row-level reasons into `_flags` and keep only what later steps need.

    The frame this returns is what the stage caches, so it is made small here: ip,
    device_id and comment_text are dropped (has_comment/comment_length derived first),
    the raw numeric text is dropped (typed copies stay), and raw_line and the raw
    event_ts text are kept only on rows with a row-level reason, the only place they
    are stored (a bot's otherwise valid rows get theirs from `bot_lines`). The reasons
    become one int bit mask (bit i = REASONS[i]; 0 = no reason): Spark's columnar cache
    costs per column, and 13 boolean columns measured slower to cache than the whole
    rest of the row. `_us` and `_parsed` stay for the bot rule, which `with_bots`
    applies on top.
    """
    flags = " + ".join(f"CASE WHEN _r_{code} THEN {1 << i} ELSE 0 END" for i, code in enumerate(REASONS) if code != "bot")
    return flagged.selectExpr(  # SQL text: one py4j call instead of one per Column (see reason_conditions)
        "event_id", "viewer_id", "session_id", "stream_id", "host_id", "product_id", "event_type", "app_version",
        "source_file", "line_number", "_ts", "_us", "_parsed", "_dwell_ms", "_price_paid", "_quantity",
        # UTC calendar date from epoch microseconds: independent of spark.sql.session.timeZone
        f"date_from_unix_date(CAST(floor(_us / {86_400 * _US_PER_S}) AS INT)) AS event_date",
        "comment_text IS NOT NULL AND length(comment_text) > 0 AS has_comment",
        "CAST(coalesce(length(comment_text), 0) AS INT) AS comment_length",
        f"0 + {flags} AS _flags",
        "CASE WHEN _bad THEN raw_line END AS raw_line",
        "CASE WHEN _bad THEN event_ts END AS event_ts",
    )


def with_bots(minimised: DataFrame, bot_viewers: Sequence[str]) -> DataFrame:
    """Set the `bot` bit on every parsed row of the bot viewers (the viewer-level reason)."""
    if not bot_viewers:
        return minimised
    is_bot = f"_parsed AND coalesce({in_sql('viewer_id', bot_viewers)}, false)"
    return minimised.withColumn("_flags", F.expr(f"_flags | CASE WHEN {is_bot} THEN {_BIT['bot']} ELSE 0 END"))


def apply_bots(flagged: DataFrame, bot_viewers: Sequence[str]) -> DataFrame:
    """`minimise` then `with_bots`: the labelled-to-be frame when the bots are already known."""
    return with_bots(minimise(flagged), bot_viewers)


def bot_lines(bronze: DataFrame, bot_viewers: Sequence[str]) -> DataFrame | None:
    """The raw line and raw event_ts text of every parsed bronze row of the bot viewers.

    `minimise` keeps the raw text only of rows with a row-level reason, so the cached
    frame can be built (and the bot rule run over it) in one scan of bronze; the few bot
    rows fetch theirs here, during the quarantine write. None when there are no bots:
    then there is nothing to fetch and no extra scan.
    """
    if not bot_viewers:
        return None
    return bronze.filter(F.coalesce(F.col("parse_ok"), F.lit(False)) & in_set("viewer_id", bot_viewers)).select(
        "source_file", "line_number", F.col("raw_line").alias("_bot_raw_line"), F.col("event_ts").alias("_bot_event_ts"))


def has_reason(code: str) -> str:
    """Whether a row of the minimised frame carries reason `code`, as SQL text."""
    return f"(_flags & {_BIT[code]}) != 0"


def duplicate_plan(marked: DataFrame, prior_ids: DataFrame | None) -> DataFrame:
    """event_ids that must not all reach silver: (event_id, _in_prior, _keep_file, _keep_line).

    Only rows without a reason take part (precedence: reasons first). One aggregation over
    today's valid rows plus the event_ids of earlier ingest dates: an id seen before is
    dropped entirely (`_in_prior`); otherwise the copy with the lowest (source_file,
    line_number) is kept, a deterministic choice so re-runs keep the same row. Ids that
    occur once today and never before are left out, so the result stays small. (A
    two-step variant that shuffles ids only, then finds first copies among the suspects,
    measured no faster: it doubles the jobs.)
    """
    valid = marked.filter(F.col("_flags") == 0).select(
        "event_id", F.struct("source_file", "line_number").alias("_pos"), F.lit(False).alias("_prior")
    )
    if prior_ids is not None:
        prior = prior_ids.select(
            "event_id", F.lit(None).cast(valid.schema["_pos"].dataType).alias("_pos"), F.lit(True).alias("_prior")
        )
        valid = valid.unionByName(prior)
    return (
        valid.groupBy("event_id")
        .agg(F.count("_pos").alias("_n"), F.max("_prior").alias("_in_prior"), F.min("_pos").alias("_first"))
        .filter((F.col("_n") > 0) & (F.col("_in_prior") | (F.col("_n") > 1)))
        .select("event_id", "_in_prior", F.col("_first.source_file").alias("_keep_file"),
                F.col("_first.line_number").alias("_keep_line"))
    )


def label(marked: DataFrame, dups: DataFrame) -> DataFrame:
    """Add `outcome` (silver | quarantine | duplicate) and `reasons` (sorted codes) to every row."""
    joined = marked.join(F.broadcast(dups), "event_id", "left")
    first = "source_file = _keep_file AND line_number = _keep_line"
    outcome = (f"CASE WHEN _flags != 0 THEN '{_OUTCOME_QUARANTINE}'"
               f" WHEN coalesce(_in_prior, false) THEN '{_OUTCOME_DUPLICATE}'"
               f" WHEN _keep_file IS NOT NULL AND NOT coalesce({first}, false) THEN '{_OUTCOME_DUPLICATE}'"
               f" ELSE '{_OUTCOME_SILVER}' END")
    # built from the cached flags on use; only quarantine rows ever project it
    reasons = "array_compact(array(" + ", ".join(f"CASE WHEN {has_reason(c)} THEN '{c}' END" for c in REASONS) + "))"
    return joined.withColumns({"outcome": F.expr(outcome), "reasons": F.expr(reasons)})


def outcome_counts(labelled: DataFrame, day: dt.date) -> dict[str, int]:
    """The conservation counts, late rows and per-reason counts, in ONE Spark job."""
    aggs = [
        "count(*) AS labelled_rows",
        f"count_if(outcome = '{_OUTCOME_SILVER}') AS silver_rows",
        f"count_if(outcome = '{_OUTCOME_QUARANTINE}') AS quarantined_rows",
        f"count_if(outcome = '{_OUTCOME_DUPLICATE}') AS duplicates_dropped",
        f"count_if(outcome = '{_OUTCOME_SILVER}' AND event_date < DATE'{day.isoformat()}') AS late_rows",
        *[f"count_if({has_reason(code)}) AS `reason.{code}`" for code in REASONS],
    ]
    row = labelled.selectExpr(*aggs).first()
    return {k: int(v or 0) for k, v in row.asDict().items()}


def to_silver(labelled: DataFrame, run_id: str, day: dt.date) -> DataFrame:
    """The silver rows in table order; ip, device_id and comment_text are already gone (`minimise`).

    ingest_date is the literal D (bronze was read for D only), so the table layer's
    replaceWhere check that every written row has ingest_date = D folds to a constant
    instead of costing a Spark job.
    """
    return labelled.filter(F.col("outcome") == _OUTCOME_SILVER).select(
        "event_id", "viewer_id", "session_id", "stream_id", "host_id", "product_id", "event_type",
        F.col("_ts").alias("event_ts"),
        F.col("_dwell_ms").alias("dwell_ms"),
        F.col("_price_paid").alias("price_paid"),
        F.col("_quantity").alias("quantity"),
        "app_version", "has_comment", "comment_length", "source_file", "line_number",
        F.lit(day).alias("ingest_date"),
        F.lit(run_id).alias("clean_run_id"),
        "event_date",
    )


def to_quarantine(labelled: DataFrame, run_id: str, day: dt.date, quarantined_at: dt.datetime,
                  bot_raw: DataFrame | None = None) -> DataFrame:
    """The rejected rows with their raw line, the raw event_ts text and every reason, sorted.

    `bot_raw` (`bot_lines`) supplies the raw text of the rows whose only reason is `bot`,
    matched on their position in the landing file (source_file, line_number).
    """
    rejected = labelled.filter(F.col("outcome") == _OUTCOME_QUARANTINE)
    if bot_raw is not None:
        fetched = F.col("raw_line").isNull()  # no row-level reason: only `bot` put it here
        rejected = rejected.join(F.broadcast(bot_raw), ["source_file", "line_number"], "left").withColumns({
            "event_ts": F.when(fetched, F.col("_bot_event_ts")).otherwise(F.col("event_ts")),
            "raw_line": F.when(fetched, F.col("_bot_raw_line")).otherwise(F.col("raw_line")),
        })
    return rejected.select(
        "raw_line", "source_file", "line_number", "event_id", "viewer_id", "event_type", "event_ts", "reasons",
        F.lit(run_id).alias("clean_run_id"),
        F.lit(quarantined_at).cast("timestamp").alias("quarantined_at"),
        F.lit(day).alias("ingest_date"),
    )


SUMMARY_SCHEMA = T.StructType([
    T.StructField(name, typ) for name, typ in [
        ("bronze_rows", T.LongType()), ("silver_rows", T.LongType()), ("quarantined_rows", T.LongType()),
        ("duplicates_dropped", T.LongType()), ("conservation_gap", T.LongType()),
        ("quarantine_ratio", T.DoubleType()), ("trailing_median_rows", T.DoubleType()), ("volume_ratio", T.DoubleType()),
    ]
])


def summary_row(counts: Mapping[str, int], bronze_rows: int, trailing_median: float | None) -> dict[str, Any]:
    """The one-row day summary the silver_day_summary suite validates."""
    silver, quarantined, dups = counts["silver_rows"], counts["quarantined_rows"], counts["duplicates_dropped"]
    return {
        "bronze_rows": bronze_rows, "silver_rows": silver, "quarantined_rows": quarantined, "duplicates_dropped": dups,
        "conservation_gap": bronze_rows - silver - quarantined - dups,
        "quarantine_ratio": quarantined / bronze_rows if bronze_rows else None,
        "trailing_median_rows": float(trailing_median) if trailing_median is not None else None,
        "volume_ratio": silver / trailing_median if trailing_median else None,
    }


def summary_frame(row: Mapping[str, Any]) -> pd.DataFrame:
    """The summary row as a one-row pandas frame, typed as SUMMARY_SCHEMA (nulls kept).

    Pandas, not Spark: GX's pandas engine checks one row in Python, with no Spark job
    that would queue behind the silver write clean runs at the same time (measured:
    the suite took 3.5 s instead of 0.8 s on a Spark frame while the write ran).
    """
    dtypes = {T.LongType(): "Int64", T.DoubleType(): "Float64"}
    return pd.DataFrame({f.name: pd.array([row[f.name]], dtype=dtypes[f.dataType]) for f in SUMMARY_SCHEMA.fields})


# ------------------------------------------------------------------------------ I/O helpers

def partition_rows(table: DeltaTable, version: int | None, column: str, values: Sequence[dt.date]) -> int | None:
    """Rows in the given partitions from the Delta log's file statistics (no Spark job).

    Independent of the Spark plan, which is what makes the conservation check mean
    something: a join that drops or duplicates rows cannot also fix this number. None
    when a file carries no record count (then the caller counts with Spark).
    """
    if version is None:
        return 0
    adds = pa.table(deltalake.DeltaTable(table.uri, version=version).get_add_actions(flatten=True)).to_pydict()
    wanted = {v.isoformat() for v in values}
    total = 0
    for part, n in zip(adds.get(f"partition.{column}", []), adds.get("num_records", []), strict=False):
        text = part.isoformat() if isinstance(part, dt.date) else (str(part) if part is not None else None)
        if text in wanted:
            if n is None:
                return None
            total += int(n)
    return total


def trailing_median_rows(ctx: Context, day: dt.date, days: int = 7) -> float | None:
    """Median silver rows of the last `days` ingest dates before D, from ops/job_runs.

    The latest successful clean run per date counts (re-runs replace their partition).
    """
    from streamrank.context import successful_runs

    latest: dict[dt.date, tuple[dt.datetime, int]] = {}
    window = [day - dt.timedelta(days=days - i) for i in range(days)]
    for r in successful_runs(ctx, STAGE, window):
        run_date = r["run_date"]
        try:
            n = json.loads(r.get("metrics") or "{}").get("silver_rows")
        except json.JSONDecodeError:
            continue
        if n is None:
            continue
        ended = r.get("ended_at") or dt.datetime.min.replace(tzinfo=dt.UTC)
        if run_date not in latest or ended >= latest[run_date][0]:
            latest[run_date] = (ended, int(n))
    values = [n for _, n in latest.values()]
    return float(statistics.median(values)) if values else None


# ------------------------------------------------------------------------------ the stage

def clean(ctx: Context, date: dt.date) -> dict[str, Any]:
    """Clean ingest date `date`: type, reason, dedup, gate, publish. Returns run.metrics.

    Raises MissingInputError (exit 5) without bronze rows for D or without the catalog
    or schedule snapshot of D, StreamrankError (exit 1) if the counts do not conserve, and
    QualityGateError (exit 3) if a critical expectation fails; in every failure case
    silver and quarantine stay at their previous versions.
    """
    from streamrank.context import stage_run

    with stage_run(ctx, STAGE, date) as run:
        previous = _previous_counts(ctx, date)  # before this run's own row is recorded
        metrics = _clean(ctx, date, run)
        stale = stale_feature_nights(previous, metrics, lambda: _feature_nights(ctx, date))
        if stale:
            # a replay (or a filled hole) changed silver that features already read
            run.metrics["feature_nights_to_rebuild"] = [n.isoformat() for n in stale]
            note = (f"silver of {date} changed after features were built as of {', '.join(map(str, stale))}: "
                    f"`streamrank nightly --date {stale[-1]} --from features` rebuilds the newest night's features, "
                    "model and rankings")
            run.message = f"{run.message}; {note}"
            log.warning("clean: %s", note)
    return dict(run.metrics)


#: the counts that say whether a re-run of clean changed silver of its ingest date
_OUTCOME_COUNTS = ("silver_rows", "quarantined_rows", "duplicates_dropped")


def stale_feature_nights(previous: Mapping[str, Any] | None, counts: Mapping[str, Any],
                         feature_nights: Callable[[], Sequence[dt.date]]) -> list[dt.date]:
    """The feature nights to rebuild after a clean: every night whose features read silver of
    the day (asked of `feature_nights` only then, as it reads ops/job_runs), unless this
    clean reproduced the previous one's outcome counts.

    A first clean of the day (``previous`` None: a hole filled after later nights ran) or one
    with other counts (a replay after a catalog correction or a new bot threshold) changed
    what those nights read.
    """
    if previous is not None and all(previous.get(k) == counts.get(k) for k in _OUTCOME_COUNTS):
        return []
    return sorted(set(feature_nights()))


def _previous_counts(ctx: Context, day: dt.date) -> dict[str, Any] | None:
    """The outcome counts of the latest successful clean of `day` (ops/job_runs), if any."""
    from streamrank.context import successful_runs

    runs = successful_runs(ctx, STAGE, [day])
    return json.loads(max(runs, key=lambda r: r["started_at"])["metrics"]) if runs else None


def _feature_nights(ctx: Context, day: dt.date) -> list[dt.date]:
    """Nights from `day` on, within the features' look-back, whose features stage succeeded."""
    from streamrank.context import successful_runs
    from streamrank.features import FeatureParams

    window = FeatureParams.from_config(ctx.cfg).lookback_days
    return [r["run_date"] for r in successful_runs(ctx, "features", [day + dt.timedelta(days=i) for i in range(window + 1)])]


def _clean(ctx: Context, day: dt.date, run: StageRun) -> dict[str, Any]:
    from streamrank.context import PhaseTimer

    phases = PhaseTimer()
    rules = CleanRules.from_config(ctx.cfg)
    spark = ctx.spark
    run.metrics["phases_s"] = phases.seconds
    cached: list[DataFrame] = []
    try:
        with phases("inputs"):
            bronze_t = ctx.table(BRONZE)
            bronze_v = bronze_t.version()
            run.read(BRONZE, bronze_v)
            bronze_rows = partition_rows(bronze_t, bronze_v, "ingest_date", [day])
            bronze = bronze_t.read(version=bronze_v).filter(F.col("ingest_date") == F.lit(day)) if bronze_v is not None else None
            if bronze_rows is None and bronze is not None:
                bronze_rows = bronze.count()
            if not bronze_rows or bronze is None:
                raise MissingInputError(f"{BRONZE} has no rows for ingest_date={day}: run `streamrank ingest --date {day}` first")
            product_ids, stream_ids = _known_ids(ctx, run, day)
            silver_t, quarantine_t = ctx.table(SILVER), ctx.table(QUARANTINE)
            silver_v = silver_t.version()
            run.read(SILVER, silver_v)
            prior_ids = _prior_ids(silver_t, silver_v, day, rules)

        typed = type_events(bronze)
        minimised = materialise(minimise(row_reasons(typed, day, rules, product_ids, stream_ids)))
        cached.append(minimised)
        with phases("reasons"):  # the first job over the frame materialises it
            candidates = bot_candidates(minimised, rules)
        with phases("bots"):
            bots = confirm_bots(minimised, candidates, rules)
        marked = with_bots(minimised, bots)
        dups = duplicate_plan(marked, prior_ids).persist(StorageLevel.MEMORY_AND_DISK_DESER)
        cached.append(dups)
        labelled = label(marked, dups)
        run_id = ctx.run_id
        silver = to_silver(labelled, run_id, day)
        quarantine = to_quarantine(labelled, run_id, day, dt.datetime.now(dt.UTC), bot_lines(bronze, bots))
        # Write, audit, publish: once the counts conserve, both tables' files are written
        # (staged, invisible) while GX checks the day summary and the silver frame; they
        # are committed only if every check passed, otherwise deleted. Each table is
        # replaced atomically for this ingest date only (other ingest dates, including
        # other rows of the same event_date partitions, are untouched).
        commit = {"stage": STAGE, "run_id": run_id, "ingest_date": day.isoformat()}
        staging: list[Future[StagedWrite]] = []
        with session_settings(spark, write_settings(rules)), ThreadPoolExecutor(max_workers=2) as pool:

            def start_writes() -> None:
                staging.extend(pool.submit(t.stage_overwrite, df, where={"ingest_date": day}, commit_info=commit)
                               for t, df in ((silver_t, silver), (quarantine_t, quarantine)))

            try:
                # the silver suite reads the staged silver files once they are written (WAP)
                _audit(ctx, day, run, phases, labelled, lambda: staging[0].result().read(silver), bronze_rows,
                       len(bots), start_writes)
                with phases("publish"):  # waits for the files, then two small commits, journaled as one
                    staged = [f.result() for f in staging]
                    publish_staged(ctx, STAGE, run, list(zip((SILVER, QUARANTINE), staged, strict=True)))
            except BaseException:
                _discard(staging)
                raise
        m = run.metrics
        run.message = (f"{bronze_rows} bronze -> {m['silver_rows']} silver + {m['quarantined_rows']} quarantined"
                       f" + {m['duplicates_dropped']} duplicates")
        return dict(run.metrics)
    finally:
        for df in cached:
            release(df)


def _audit(ctx: Context, day: dt.date, run: StageRun, phases: PhaseTimer, labelled: DataFrame,
           silver: Callable[[], DataFrame], bronze_rows: int, bot_viewers: int, start_writes: Callable[[], None]) -> None:
    """Conservation, then the GX gate: raises (nothing may be published) unless both pass.

    `start_writes` is called once the counts conserve, before GX runs: GX checks the day
    summary while the staged writes use the cores, then `silver()`: the staged silver
    files, the rows about to be published (reading their needed columns costs less than
    recomputing the frame for each GX job; see docs/performance.md).
    """
    from streamrank.quality import Check, record_and_gate, validate_all

    with phases("dedup_counts"):
        counts = outcome_counts(labelled, day)
    run.metrics.update({
        "bronze_rows": bronze_rows, "silver_rows": counts["silver_rows"], "quarantined_rows": counts["quarantined_rows"],
        "duplicates_dropped": counts["duplicates_dropped"], "late_rows": counts["late_rows"],
        "bot_viewers": bot_viewers,
        "reasons": {code: counts[f"reason.{code}"] for code in REASONS if counts[f"reason.{code}"]},
    })
    accounted = counts["silver_rows"] + counts["quarantined_rows"] + counts["duplicates_dropped"]
    if accounted != bronze_rows or counts["labelled_rows"] != bronze_rows:
        raise StreamrankError(
            f"conservation violated for ingest_date={day}: bronze {bronze_rows} rows != silver {counts['silver_rows']}"
            f" + quarantined {counts['quarantined_rows']} + duplicates {counts['duplicates_dropped']}"
            f" (labelled {counts['labelled_rows']}); nothing published"
        )
    # Nothing can be published unless the counts conserve; from here on the files are
    # written (invisible) while GX checks the day, and committed only if every check passed.
    start_writes()
    run_id = ctx.run_id
    median = trailing_median_rows(ctx, day)
    summary = summary_row(counts, bronze_rows, median)
    run.metrics["quarantine_ratio"] = round(summary["quarantine_ratio"], 6)
    run.metrics["volume_ratio"] = None if summary["volume_ratio"] is None else round(summary["volume_ratio"], 4)
    band = float(ctx.cfg.get("quality.volume_band", 0.5))
    params = {"max_quarantine_ratio": float(ctx.cfg.get("quality.max_quarantine_ratio", 0.1)),
              "min_volume_ratio": 1.0 - band, "max_volume_ratio": 1.0 + band}
    with phases("validate"):  # the summary (pandas, in Python) first, then GX's jobs over the staged silver files
        reports = validate_all([Check(summary_frame(summary), SUMMARY_SUITE, params), Check(silver, SILVER_SUITE)],
                               ctx.cfg.reports / "data_docs", f"clean-{day}-{run_id}")
    run.metrics["data_docs"] = [r.data_docs for r in reports]
    record_and_gate(reports, ctx.table("ops/dq_results"), run_id, STAGE, day)


def _discard(staging: Sequence[Future[StagedWrite]]) -> None:
    """Remove the files of every staged write not yet committed (waiting for those still being written)."""
    for future in staging:
        try:
            future.result().discard()
        except Exception as exc:  # noqa: BLE001 - the error being raised already says why the stage failed
            log.warning("clean: a staged write failed too (%s); what it left is unreferenced and `vacuum` removes it", exc)


def write_settings(rules: CleanRules) -> dict[str, str]:
    """Session settings for clean's two writes: `unsorted_partition_writes`, and no Parquet
    dictionary for the columns whose values (almost) never repeat (`NO_DICTIONARY`)."""
    return {**unsorted_partition_writes(rules), **without_dictionaries(NO_DICTIONARY)}


def unsorted_partition_writes(rules: CleanRules) -> dict[str, str]:
    """Session settings that let the silver write skip its sort by event_date.

    Spark plans a sort of every row by the partition columns before a partitioned write
    (planned writes), so that one file is open at a time. A day's rows only span the
    event dates from D - max_lateness_days to D + 1 (the rest are quarantined), so each
    task can keep one file per date open instead: no sort of the ~1M rows, ~15 % of the
    silver write at scale 1 (bench_clean). More dates than that in one task would make
    Spark fall back to sorting, never fail. Session-wide while set: clean holds them from
    staging its writes to its commits, while its other jobs only read.
    """
    return {
        "spark.sql.optimizer.plannedWrite.enabled": "false",
        "spark.sql.maxConcurrentOutputFileWriters": str(rules.max_lateness_days + 2),
    }


def materialise(df: DataFrame) -> DataFrame:
    """Keep `df` in executor memory (spilling to disk) once its first job has computed it.

    A local checkpoint, not DataFrame.persist: the columnar cache converts every row to
    compressed column batches, which measured about twice the computing cost of this
    frame at 1M rows, and scans of it were slower too (bench_clean, median of 4: local
    checkpoint 19.4 s, persist 27-29 s, persist uncompressed 22.9 s for fill + counts +
    GX + silver write). The price: lineage is cut, so if an executor is lost mid-stage
    the stage fails instead of recomputing -- and, being atomic and idempotent, is
    simply run again. Lazy (eager=False): the first job fills it, no extra count job.
    """
    return df.localCheckpoint(eager=False)


def release(df: DataFrame) -> None:
    """Free what `materialise` or persist holds now, rather than at the JVM's next GC."""
    df.unpersist()
    try:  # a local checkpoint is a LogicalRDD over a persisted RDD; py4j reaches it
        plan = df._jdf.logicalPlan()
        if plan.getClass().getSimpleName() == "LogicalRDD":
            plan.rdd().unpersist(False)
    except Exception:  # noqa: BLE001 - Spark's ContextCleaner frees it later anyway
        pass


def _known_ids(ctx: Context, run: StageRun, day: dt.date) -> tuple[set[str], set[str]]:
    """Product ids of the catalog snapshot of D and stream ids of the schedules of D-1 and D.

    Read through delta-rs and pyarrow, only the snapshot partitions needed: a few thousand
    ids are not worth a Spark job (0.2-0.25 s of a warm scale-1 clean). They become
    hash-set lookups in the labelling scan. A missing catalog or schedule of D is a
    missing input (exit 5, as ingest treats them), not a day on which every product or
    stream is unknown; D-1's schedule is optional (a warehouse's first day has none).
    """
    products_t, streams_t = ctx.table(PRODUCTS), ctx.table(STREAMS)
    pv, sv = products_t.version(), streams_t.version()
    run.read(PRODUCTS, pv)
    run.read(STREAMS, sv)
    for name, table, version in ((PRODUCTS, products_t, pv), (STREAMS, streams_t, sv)):
        if not partition_rows(table, version, "snapshot_date", [day]):
            raise MissingInputError(
                f"{name} has no rows for snapshot_date={day}: without it every event would reference an unknown id;"
                f" run `streamrank ingest --date {day}` first"
            )
    products = products_t.to_arrow(pv, partitions={"snapshot_date": [day]}).column("product_id")
    streams = streams_t.to_arrow(sv, partitions={"snapshot_date": [day - dt.timedelta(days=1), day]}).column("stream_id")
    return ({i for i in products.to_pylist() if i is not None}, {i for i in streams.to_pylist() if i is not None})


def _prior_ids(silver_t: DeltaTable, version: int | None, day: dt.date, rules: CleanRules) -> DataFrame | None:
    """event_ids in silver from the ingest dates within dedup_lookback_days of D, before
    and after it (never D itself).

    Excluding D is what keeps a re-run from deduplicating against its own earlier output.
    Later dates matter when an earlier day is cleaned after them (a backfill): whichever
    copy of an event silver published first stays, wherever it was ingested, so cleaning
    days in any order, and re-running any of them, leaves each event in silver once. A
    nightly in date order has no later dates, and no file of them is scanned. The
    event_date bounds only prune partitions: a row of ingest date X has an event_date
    between X - max_lateness_days and the end of X + future_tolerance_hours.
    """
    if not version or rules.dedup_lookback_days <= 0:
        return None
    one, n = dt.timedelta(days=1), dt.timedelta(days=rules.dedup_lookback_days)
    windows = _windows_held(silver_t, version, [(day - n, day - one), (day + one, day + n)])
    if not windows:
        return None  # e.g. a warehouse's first day, or a re-run of it: no scan at all
    first, last = windows[0][0], windows[-1][1]
    lo = first - dt.timedelta(days=rules.max_lateness_days + 1)
    hi = (dt.datetime.combine(last, dt.time()) + dt.timedelta(days=1, hours=rules.future_tolerance_hours)).date()
    return (
        silver_t.read(version=version)
        .filter(F.col("event_date").between(F.lit(lo), F.lit(hi)))
        .filter(F.col("ingest_date").between(F.lit(first), F.lit(last)) & (F.col("ingest_date") != F.lit(day)))
        .select("event_id")
    )


def _windows_held(table: DeltaTable, version: int, windows: list[tuple[dt.date, dt.date]]) -> list[tuple[dt.date, dt.date]]:
    """The [first, last] windows that some file's ingest_date statistics overlap (all of
    them when a file has no statistics): one read of the snapshot's add actions."""
    adds = pa.table(deltalake.DeltaTable(table.uri, version=version).get_add_actions(flatten=True)).to_pydict()
    lows, highs = adds.get("min.ingest_date"), adds.get("max.ingest_date")
    if lows is None or highs is None:
        return list(windows) if adds.get("path") else []
    spans = [(_as_date(lo), _as_date(hi)) if lo is not None and hi is not None else (dt.date.min, dt.date.max)
             for lo, hi in zip(lows, highs, strict=True)]
    return [(first, last) for first, last in windows if any(lo <= last and hi >= first for lo, hi in spans)]


def _as_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def run(ctx: Context, args: argparse.Namespace) -> int:
    """`streamrank clean --date D`: errors propagate with their exit code (cli.main maps them)."""
    clean(ctx, args.date)
    return 0
