"""Features stage: silver events up to D -> gold vocabularies, viewer features, training examples.

Why it is built the way it is:

- One code path computes the state of a viewer "as of a cutoff" (the RFM purchase power,
  engagement and the last L behaviour events); the serving features of D (cutoff D+1
  00:00 UTC) and every training example (cutoffs at the end of D-6 .. D-1) go through it,
  so training and scoring cannot drift apart (no train/serve skew).
- Cutoffs lie on slot boundaries (a slot is a day when ``features.cutoffs_per_day`` is 1),
  so events are first reduced to one row per (viewer, slot): counts and sums, plus that
  slot's last L product events. A cutoff then only needs the slots in its look-back window:
  each (viewer, slot) row is exploded to the few cutoffs that see it and grouped again.
  That is two shuffles for all cutoffs together and bounds every array at L per slot;
  no Python UDF and no per-row Python run, nothing but the vocabulary thresholds reaches
  the driver.
- Ids are dense ints from the vocabulary of D: 0 is padding, 1 is unknown, real tokens
  start at 2 in sorted order, so the same inputs always give the same ids.
- Sequence arrays are LEFT-padded (oldest first, most recent last) so the model's causal
  attention reads the newest event at the last position; target arrays are right-padded.
- Every output is replaced for its as_of_date partition in one commit, so a re-run for
  the same date leaves identical tables.
- Features of D are built from what had landed by D's ingest (`known_by`: silver rows of
  ingest_date <= D): the night itself saw nothing later, and a re-run after later days
  were cleaned (a backfill, a fix) must not pull in their late events of D and change
  D's tables.
- A day of the window that clean never published (a night that was skipped and not
  backfilled: no successful clean run in ops/job_runs) is a gap, not a quiet day: the few
  late rows of it that the next ingest brings would make the targets of the cutoff before
  it look like "bought nothing". Training cutoffs whose target day is a gap are left out
  (their labels are unknown, not 0) and the stage warns with the days to backfill;
  histories across a gap are simply shorter.

Definitions (all times UTC; a "window before c" is [c - N days, c)):

- history events: silver events with a product_id (view_product, click_product,
  add_to_cart, purchase, and like/comment/share/gift which carry the product on air),
  strictly before the cutoff and within ``features.history_days``; ties on event_ts are
  ordered by event type (funnel order), then product, category and dwell bucket.
- targets of a cutoff c: add_to_cart and purchase events in [c, c + 1 day) - the UTC day
  that follows the cutoff. The window is half-open on the right (not (c, c+1d]) so that
  it is exactly the complement of the strict history of the next cutoff: no event is in
  both, none falls in between.
- stream context: every history event carries its stream's host (``hist_host``, host
  vocabulary of D; an event without a host or a host unknown to D is 1) and its UTC hour of
  day (``hist_hour`` = 2 + hour); every candidate carries the host and hour of its earliest
  slot on the schedule of its target day (``cand_host``, ``cand_hour``; padding 0). Which
  stream a viewer watches - favourite hosts, the hours they are online - decides what they
  can buy, and product ids alone do not say which host will show a product tomorrow.
- dwell bucket: 1 for dwell < 100 ms (also 0 / null: likes, clicks, carts), else
  2 + floor(log2(dwell_ms / 100)) capped at 15 (>= ~13.7 min); 0 is padding.
- price tier 1..5: the viewer's price level is the average unit price paid over 30 days
  (sum price_paid / sum quantity) if they bought, else the average list price of the
  products they viewed, clicked or carted over 30 days; the tier is 1 + the number of
  catalog list-price quintile boundaries (20/40/60/80 %, catalog of D) below that level.
  Catalog quantiles (not viewer quantiles) keep the tier stable across days and cutoffs.
  A viewer with no price signal gets the middle tier 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from streamrank.config import Config, parse_date
from streamrank.context import Context, StageRun, stage_run, successful_runs
from streamrank.errors import ConfigError, MissingInputError
from streamrank.publish import StagedTables

log = logging.getLogger(__name__)

#: The event types of DESIGN section 5, in the fixed order of the event vocabulary.
EVENT_TYPES: tuple[str, ...] = (
    "enter_stream", "leave_stream", "view_product", "like", "comment", "share", "gift",
    "click_product", "add_to_cart", "purchase",
)
PAD_IDX, UNK_IDX, FIRST_IDX = 0, 1, 2
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
VOCAB_KINDS = ("product", "category", "event", "host")
#: Training days before D (cutoffs at the end of D-TRAIN_DAYS .. D-1); conf key features.train_days once it exists.
TRAIN_DAYS = 6
#: Share of the validation cutoff's viewers whose rows become split 'test' (conf features.test_share).
TEST_SHARE = 0.5
#: Resolution of the viewer hash that assigns 'test' (so a share is exact to 1/10,000).
_TEST_BUCKETS = 10_000
#: recency_days of a viewer with no purchase in the 30-day window.
NEVER_RECENCY_DAYS = 999.0
#: Tier of a viewer without any price signal: the middle one.
DEFAULT_PRICE_TIER = 3
RFM_SHORT_DAYS, RFM_LONG_DAYS = 7, 30
ACTIVE_TRAIN_DAYS = 7  # a training example needs >= 1 history event in this many days before its cutoff
DWELL_BUCKETS, DWELL_BASE_MS = 15, 100.0
PP_FEATURES = (
    "log1p_recency_days", "log1p_frequency_7d", "log1p_frequency_30d", "log1p_monetary_7d",
    "log1p_monetary_30d", "log1p_avg_price_paid", "price_tier_over_5", "log1p_n_events",
)
ROWS_PER_FILE = 250_000  # training rows per Parquet file: big row groups for Petastorm, a handful of files
MAX_FILES = 16
DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000

SILVER = "silver/viewer_events"
PRODUCTS = "bronze/products"
STREAM_PRODUCTS = "bronze/stream_products"
STREAMS = "bronze/streams"
VOCAB = "gold/vocabularies"
VIEWER_FEATURES = "gold/viewer_features"
TRAINING = "gold/training_examples"


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class FeatureParams:
    """The feature settings of one run, read once from the conf."""

    seq_len: int = 50
    history_days: int = 30
    cand_size: int = 32
    target_size: int = 10
    cutoffs_per_day: int = 1
    train_days: int = TRAIN_DAYS
    test_share: float = TEST_SHARE

    @classmethod
    def from_config(cls, cfg: Config) -> FeatureParams:
        params = cls(
            seq_len=int(cfg["features.seq_len"]), history_days=int(cfg["features.history_days"]),
            cand_size=int(cfg["features.cand_size"]), target_size=int(cfg["features.target_size"]),
            cutoffs_per_day=int(cfg["features.cutoffs_per_day"]),
            train_days=int(cfg.get("features.train_days", TRAIN_DAYS)),
            test_share=float(cfg.get("features.test_share", TEST_SHARE)),
        )
        params.validate()
        return params

    def validate(self) -> None:
        for name in ("seq_len", "history_days", "cand_size", "target_size", "cutoffs_per_day", "train_days"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'features.{name}': expected an integer >= 1, got {getattr(self, name)}")
        if DAY_US % self.cutoffs_per_day:
            raise ConfigError(
                f"config key 'features.cutoffs_per_day': must divide a day into whole microseconds, got {self.cutoffs_per_day}")
        if not 0.0 < self.test_share < 1.0:
            raise ConfigError(f"config key 'features.test_share': expected a share strictly between 0 and 1, got {self.test_share}")
        if self.target_size > self.cand_size:
            raise ConfigError(f"features.target_size ({self.target_size}) must not exceed features.cand_size ({self.cand_size})")

    @property
    def slot_us(self) -> int:
        """Length of a slot, the grain events are summarised at; cutoffs lie on slot boundaries."""
        return DAY_US // self.cutoffs_per_day

    @property
    def lookback_days(self) -> int:
        """How far back any feature looks: the sequence window or the 30-day RFM window."""
        return max(self.history_days, RFM_LONG_DAYS)


def _midnight_us(day: dt.date) -> int:
    return (day - dt.date(1970, 1, 1)).days * DAY_US


def feature_cutoff_us(as_of: dt.date) -> int:
    """The serving cutoff of D: D+1 00:00 UTC (the end of D), in microseconds since the epoch."""
    return _midnight_us(as_of + dt.timedelta(days=1))


def training_cutoffs(as_of: dt.date, params: FeatureParams) -> list[tuple[int, str]]:
    """(cutoff_us, split) of the training examples of D.

    Cutoffs lie in the days D-train_days .. D-1, `cutoffs_per_day` per day, the last at the
    end of each day. The cutoff D 00:00 (targets = day D) is "valid"; "train" keeps only
    cutoffs whose target day ends by D 00:00, so no training target overlaps the validation
    day (with one cutoff per day that is every other cutoff).
    """
    valid_us = _midnight_us(as_of)
    out = []
    for back in range(params.train_days, 0, -1):
        start = _midnight_us(as_of - dt.timedelta(days=back))
        for k in range(1, params.cutoffs_per_day + 1):
            c = start + k * params.slot_us
            if c == valid_us:
                out.append((c, "valid"))
            elif c + DAY_US <= valid_us:
                out.append((c, "train"))
    return out


def uncleaned_days(cleaned: set[dt.date], lo: dt.date, hi: dt.date) -> list[dt.date]:
    """Days from the first cleaned day in [lo, hi] up to hi that clean did not publish.

    Days before the first cleaned one are where the warehouse starts, not gaps; a
    warehouse with no clean runs recorded at all (silver loaded some other way) has none.
    """
    days = {d for d in cleaned if lo <= d <= hi}
    if not days:
        return []
    first = min(days)
    every = (first + dt.timedelta(days=n) for n in range((hi - first).days + 1))
    return [d for d in every if d not in days]


def cutoffs_clear_of(cuts: list[tuple[int, str]], gaps: list[dt.date]) -> tuple[list[tuple[int, str]], list[int]]:
    """(kept, left out): a cutoff is left out when its target window [c, c + 1 day) touches a gap day."""
    spans = [(_midnight_us(g), _midnight_us(g) + DAY_US) for g in gaps]
    kept, left_out = [], []
    for c, split in cuts:
        if any(c < end and c + DAY_US > start for start, end in spans):
            left_out.append(c)
        else:
            kept.append((c, split))
    return kept, left_out


def day_ranges(days: list[dt.date]) -> str:
    """'2026-10-26..2026-11-01, 2026-11-03': sorted days as runs of consecutive days."""
    runs: list[list[dt.date]] = []
    for d in sorted(days):
        if runs and d - runs[-1][-1] == dt.timedelta(days=1):
            runs[-1].append(d)
        else:
            runs.append([d])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def known_by(silver: DataFrame, day: dt.date) -> DataFrame:
    """Silver rows ingested by the end of `day`: what the night of `day` had.

    Features, evaluate's baselines and score's popularity of D read silver through this,
    so a re-run of D after later days were cleaned rebuilds what D built, without the late
    events of D that arrived afterwards.
    """
    return silver.filter(F.col("ingest_date") <= F.lit(day))


def silver_window(as_of: dt.date, params: FeatureParams) -> tuple[dt.date, dt.date]:
    """The event_date partitions the stage reads: [D - lookback - train_days, D]."""
    return as_of - dt.timedelta(days=params.lookback_days + params.train_days), as_of


# ----------------------------------------------------------------------------- column helpers

def dwell_bucket(dwell_ms: Column) -> Column:
    """Log-scale dwell bucket 1..15 (0 is padding): dwell carries intent but spans 5 decades."""
    raw = F.floor(F.log2(dwell_ms.cast("double") / F.lit(DWELL_BASE_MS))) + 2
    return (
        F.when(dwell_ms.isNull() | (dwell_ms < F.lit(DWELL_BASE_MS)), F.lit(1))
        .otherwise(F.least(raw, F.lit(DWELL_BUCKETS)).cast("int"))
        .cast("int")
    )


def hour_token(ts_us: Column) -> Column:
    """Hour-of-day id 2 + UTC hour (0 padding, 1 unknown) of a time in microseconds since the epoch."""
    return F.coalesce((F.pmod(F.floor(ts_us / F.lit(HOUR_US)), F.lit(24)) + 2).cast("int"), F.lit(UNK_IDX))


def event_index(event_type: Column) -> Column:
    """Event-type id: 2 + position in EVENT_TYPES, 1 for an unknown type (no join needed)."""
    pos = F.array_position(F.array(*[F.lit(t) for t in EVENT_TYPES]), event_type)
    return F.when(pos > 0, pos + 1).otherwise(F.lit(UNK_IDX)).cast("int")


def _left_pad(arr: Column, length: int, pad: Column) -> Column:
    return F.concat(F.array_repeat(pad, F.lit(length) - F.size(arr)), arr)


def _right_pad(arr: Column, length: int, pad: Column) -> Column:
    return F.concat(arr, F.array_repeat(pad, F.lit(length) - F.size(arr)))


def _last(arr: Column, n: int) -> Column:
    """The last n elements of an array (all of it if shorter), order kept."""
    return F.slice(arr, F.greatest(F.size(arr) - F.lit(n - 1), F.lit(1)), F.lit(n))


# ----------------------------------------------------------------------------- pure transformations

def latest_catalog(products: DataFrame) -> DataFrame:
    """One row per product of a catalog snapshot: product_id, category, list_price.

    A snapshot should not repeat a product; if it does the first line of the file wins,
    so the choice is deterministic.
    """
    first = F.min(F.struct(F.coalesce(F.col("line_number"), F.lit(0)).alias("ln"), "category", "list_price"))
    return (
        products.filter(F.col("product_id").isNotNull())
        .groupBy("product_id").agg(first.alias("f"))
        .select("product_id", F.col("f.category").alias("category"), F.col("f.list_price").alias("list_price"))
    )


def build_vocabularies(catalog: DataFrame, silver: DataFrame, as_of: dt.date) -> DataFrame:
    """gold/vocabularies rows: products (catalog + silver), categories (catalog), hosts (silver), event types.

    Each kind has <pad> = 0 and <unk> = 1; real tokens are numbered from 2 in sorted order
    (event types in the fixed order of EVENT_TYPES), so ids depend only on the token sets.
    """
    spark = catalog.sparkSession
    products = catalog.select(F.col("product_id").alias("token")).unionByName(
        silver.filter(F.col("product_id").isNotNull()).select(F.col("product_id").alias("token"))
    ).distinct().withColumn("kind", F.lit("product"))
    categories = (
        catalog.filter(F.col("category").isNotNull()).select(F.col("category").alias("token")).distinct()
        .withColumn("kind", F.lit("category"))
    )
    hosts = (
        silver.filter(F.col("host_id").isNotNull()).select(F.col("host_id").alias("token")).distinct()
        .withColumn("kind", F.lit("host"))
    )
    ranked = products.unionByName(categories).unionByName(hosts).withColumn(
        "idx", (F.row_number().over(Window.partitionBy("kind").orderBy("token")) + FIRST_IDX - 1).cast("int")
    )
    fixed = [(kind, PAD_TOKEN, PAD_IDX) for kind in VOCAB_KINDS]
    fixed += [(kind, UNK_TOKEN, UNK_IDX) for kind in VOCAB_KINDS]
    fixed += [("event", t, FIRST_IDX + i) for i, t in enumerate(EVENT_TYPES)]
    fixed_df = spark.createDataFrame(fixed, "kind string, token string, idx int")
    return (
        ranked.select("kind", "token", "idx").unionByName(fixed_df)
        .withColumn("as_of_date", F.lit(as_of))
    )


def product_lookup(vocab: DataFrame, catalog: DataFrame) -> DataFrame:
    """product_id -> (p_idx, c_idx, list_price): the broadcast side of the event encoding."""
    products = vocab.filter((F.col("kind") == "product") & (F.col("idx") >= FIRST_IDX)).select(
        F.col("token").alias("product_id"), F.col("idx").alias("p_idx"))
    categories = vocab.filter((F.col("kind") == "category") & (F.col("idx") >= FIRST_IDX)).select(
        F.col("token").alias("category"), F.col("idx").alias("c_idx"))
    return (
        products.join(catalog, "product_id", "left")
        .join(F.broadcast(categories), "category", "left")
        .select("product_id", "p_idx", F.coalesce("c_idx", F.lit(UNK_IDX)).cast("int").alias("c_idx"), "list_price")
    )


def host_lookup(vocab: DataFrame) -> DataFrame:
    """host_id -> h_idx (real hosts of the vocabulary)."""
    return vocab.filter((F.col("kind") == "host") & (F.col("idx") >= FIRST_IDX)).select(
        F.col("token").alias("host_id"), F.col("idx").alias("h_idx"))


def encode_events(silver: DataFrame, lookup: DataFrame, hosts: DataFrame, params: FeatureParams) -> DataFrame:
    """Silver events -> ints the model reads, plus the slot each event falls in."""
    ts_us = F.unix_micros(F.col("event_ts"))
    return (
        silver.filter(F.col("viewer_id").isNotNull() & F.col("event_ts").isNotNull())
        .join(F.broadcast(lookup), "product_id", "left")
        .join(F.broadcast(hosts), "host_id", "left")
        .select(
            "viewer_id", "event_type", "dwell_ms", "price_paid", "quantity", "list_price",
            ts_us.alias("ts_us"),
            F.floor(ts_us / F.lit(params.slot_us)).cast("long").alias("slot"),
            F.col("product_id").isNotNull().alias("has_product"),
            F.when(F.col("product_id").isNotNull(), F.coalesce("p_idx", F.lit(UNK_IDX))).cast("int").alias("p"),
            F.when(F.col("product_id").isNotNull(), F.coalesce("c_idx", F.lit(UNK_IDX))).cast("int").alias("c"),
            event_index(F.col("event_type")).alias("e"),
            dwell_bucket(F.col("dwell_ms")).alias("dwb"),
            F.coalesce("h_idx", F.lit(UNK_IDX)).cast("int").alias("h"),
            hour_token(ts_us).alias("hr"),
        )
    )


def slot_summaries(events: DataFrame, params: FeatureParams) -> DataFrame:
    """One row per (viewer, slot): additive counts and sums, the slot's last L product
    events (enough for any cutoff on a slot boundary) and its cart/purchase products."""
    et = F.col("event_type")
    is_buy = et == "purchase"
    is_tgt = et.isin("add_to_cart", "purchase")
    priced = et.isin("view_product", "click_product", "add_to_cart") & F.col("list_price").isNotNull()
    count_if = lambda cond: F.sum(F.when(cond, 1).otherwise(0)).cast("long")  # noqa: E731
    hist_item = F.struct(
        F.col("ts_us").alias("ts"), F.col("e").alias("e"), F.col("p").alias("p"), F.col("c").alias("c"), F.col("dwb").alias("dwb"),
        F.col("h").alias("h"), F.col("hr").alias("hr"))
    tgt_item = F.struct(F.col("ts_us").alias("ts"), F.col("e").alias("e"), F.col("p").alias("p"))
    return (
        events.groupBy("viewer_id", "slot").agg(
            F.count(F.lit(1)).alias("n_events"),
            count_if(et == "like").alias("likes"),
            count_if(et == "comment").alias("comments"),
            count_if(et == "gift").alias("gifts"),
            F.sum(F.when(et == "view_product", F.coalesce("dwell_ms", F.lit(0))).otherwise(0)).cast("long").alias("watch_ms"),
            F.sum(F.coalesce("dwell_ms", F.lit(0))).cast("long").alias("dwell_ms"),
            count_if(is_buy).alias("purchases"),
            _money_sum(F.when(is_buy, F.col("price_paid"))).alias("spend"),
            F.sum(F.when(is_buy, F.coalesce("quantity", F.lit(1))).otherwise(0)).cast("long").alias("units"),
            F.max(F.when(is_buy, F.col("ts_us"))).alias("last_buy_us"),
            F.max("ts_us").alias("last_us"),
            _money_sum(F.when(priced, F.col("list_price"))).alias("seen_price_sum"),
            count_if(priced).alias("seen_price_n"),
            count_if(F.col("has_product")).alias("n_hist"),
            F.sort_array(F.collect_list(F.when(F.col("has_product"), hist_item))).alias("seq_all"),
            F.sort_array(F.collect_list(F.when(is_tgt, tgt_item))).alias("tgt"),
            F.max(F.when(is_buy, 1).otherwise(0)).alias("bought"),
        )
        .withColumn("seq", _last(F.col("seq_all"), params.seq_len))
        .drop("seq_all")
    )


#: money is summed as a decimal: a sum of doubles depends on the order of its terms, and the
#: order of rows in a table's files is not part of its content (compaction changes it), so a
#: re-run would otherwise differ in the last digit (245.36999999999998 against 245.37)
MONEY = "decimal(38,6)"


def _money_sum(amounts: Column) -> Column:
    """Exact, order-independent sum of money amounts (nulls skipped; 0 when there are none)."""
    return F.coalesce(F.sum(amounts.try_cast(MONEY)), F.lit(0).cast(MONEY))


def cutoff_states(slots: DataFrame, cutoffs_us: list[int], params: FeatureParams) -> DataFrame:
    """One row per (viewer, cutoff) the viewer has any slot around: the viewer as of the cutoff.

    Each slot row goes to the cutoffs whose look-back window or target day contains it;
    conditional sums over relative slot offsets give the 7/30-day and history windows.
    """
    n = params.cutoffs_per_day
    cut_slots = [c // params.slot_us for c in cutoffs_us]
    look, hist = params.lookback_days * n, params.history_days * n
    w7, w30 = RFM_SHORT_DAYS * n, RFM_LONG_DAYS * n
    slot = F.col("slot")
    mine = F.filter(F.array(*[F.lit(c).cast("long") for c in cut_slots]), lambda c: (slot >= c - look) & (slot < c + n))
    rel = F.col("slot") - F.col("cslot")  # < 0: before the cutoff, 0 .. n-1: the target day

    def within(days_slots: int) -> Column:
        return (rel >= -days_slots) & (rel < 0)

    def total(col: str, days_slots: int, dtype: str = "long") -> Column:
        return F.coalesce(F.sum(F.when(within(days_slots), F.col(col))), F.lit(0)).cast(dtype)

    states = (
        slots.withColumn("cslot", F.explode(mine))
        .groupBy("viewer_id", "cslot").agg(
            total("n_events", hist).alias("n_events"),
            total("likes", hist).alias("likes"),
            total("comments", hist).alias("comments"),
            total("gifts", hist).alias("gifts"),
            total("watch_ms", hist).alias("watch_time_ms"),
            total("dwell_ms", hist).alias("dwell_ms_total"),
            F.max(F.when(within(hist), F.col("last_us"))).alias("last_us"),
            total("n_hist", ACTIVE_TRAIN_DAYS * n).alias("n_hist_7d"),
            total("purchases", w7).alias("frequency_7d"),
            total("purchases", w30).alias("frequency_30d"),
            total("spend", w7, "double").alias("monetary_7d"),
            total("spend", w30, "double").alias("monetary_30d"),
            total("units", w30).alias("units_30d"),
            F.max(F.when(within(w30), F.col("last_buy_us"))).alias("last_buy_us"),
            total("seen_price_sum", w30, "double").alias("seen_price_sum"),
            total("seen_price_n", w30).alias("seen_price_n"),
            F.collect_list(F.when(within(hist), F.struct("slot", "seq"))).alias("seq_slots"),
            F.collect_list(F.when(rel >= 0, F.struct("slot", "tgt"))).alias("tgt_slots"),
            F.coalesce(F.max(F.when(rel >= 0, F.col("bought"))), F.lit(0)).cast("int").alias("label_purchase"),
        )
        .withColumn("cutoff_us", F.col("cslot") * F.lit(params.slot_us))
        # Slots do not overlap in time and each slot's list is already sorted, so ordering the
        # (at most look-back) slots is enough: no sort of up to days * L events per row.
        .withColumn("seq", _last(_chronological("seq_slots", "seq"), params.seq_len))
        .withColumn("tgt", _chronological("tgt_slots", "tgt"))
        .drop("seq_slots", "tgt_slots")
    )
    return states


def _chronological(slots: str, field: str) -> Column:
    """Concatenate per-slot sorted event lists in slot order."""
    return F.flatten(F.transform(F.sort_array(F.col(slots)), lambda x: x[field]))


def pp_features_expr() -> Column:
    """The 8 purchase-power inputs of the model (order of PP_FEATURES), from gold/viewer_features columns.

    Public so the scorer builds the serving vector from gold/viewer_features with the very
    expression the training examples were built with.
    """
    return F.array(
        F.log1p("recency_days"), F.log1p("frequency_7d"), F.log1p("frequency_30d"), F.log1p("monetary_7d"),
        F.log1p("monetary_30d"), F.log1p("avg_price_paid"), F.col("price_tier") / F.lit(5.0), F.log1p("n_events"),
    ).cast("array<float>")


def with_purchase_power(states: DataFrame, thresholds: list[float]) -> DataFrame:
    """Add recency_days, avg_price_paid, price_tier and the 8 pp_features (see module doc)."""
    c_us = F.col("cutoff_us")
    recency = F.when(F.col("last_buy_us").isNotNull(), (c_us - F.col("last_buy_us")) / F.lit(float(DAY_US))).otherwise(
        F.lit(NEVER_RECENCY_DAYS))
    avg_paid = F.when(F.col("units_30d") > 0, F.col("monetary_30d") / F.col("units_30d")).otherwise(F.lit(0.0))
    level = (
        F.when(F.col("frequency_30d") > 0, F.col("avg_price_paid"))
        .when(F.col("seen_price_n") > 0, F.col("seen_price_sum") / F.col("seen_price_n"))
    )
    if thresholds:
        tier = F.lit(1)
        for q in thresholds:
            tier = tier + F.when(F.col("_level") > F.lit(float(q)), 1).otherwise(0)
        tier = F.when(F.col("_level").isNull(), F.lit(DEFAULT_PRICE_TIER)).otherwise(tier)
    else:
        tier = F.lit(DEFAULT_PRICE_TIER)
    return (
        states.withColumn("recency_days", recency.cast("double"))
        .withColumn("avg_price_paid", avg_paid.cast("double"))
        .withColumn("_level", level)
        .withColumn("price_tier", tier.cast("int"))
        .drop("_level")
        .withColumn("pp_features", pp_features_expr())
    )


def with_history_arrays(states: DataFrame, params: FeatureParams) -> DataFrame:
    """hist_* arrays of exactly L, left-padded with 0, oldest first; hist_dt in hours before the cutoff."""
    L = params.seq_len
    hist = F.col("seq")  # already the last L history events, oldest first
    c_us = F.col("cutoff_us")
    zero_i, zero_f = F.lit(PAD_IDX).cast("int"), F.lit(0.0).cast("float")
    return (
        states.withColumn("_h", hist)
        .withColumn("hist_len", F.size("_h").cast("int"))
        .withColumn("hist_product", _left_pad(F.transform("_h", lambda x: x["p"]), L, zero_i))
        .withColumn("hist_category", _left_pad(F.transform("_h", lambda x: x["c"]), L, zero_i))
        .withColumn("hist_event", _left_pad(F.transform("_h", lambda x: x["e"]), L, zero_i))
        .withColumn("hist_dwell", _left_pad(F.transform("_h", lambda x: x["dwb"]), L, zero_i))
        .withColumn("hist_host", _left_pad(F.transform("_h", lambda x: x["h"]), L, zero_i))
        .withColumn("hist_hour", _left_pad(F.transform("_h", lambda x: x["hr"]), L, zero_i))
        .withColumn("hist_dt", _left_pad(
            F.transform("_h", lambda x: ((c_us - x["ts"]) / F.lit(float(HOUR_US))).cast("float")), L, zero_f))
        .drop("_h")
    )


def viewer_features(states: DataFrame, cutoff_us: int, as_of: dt.date, params: FeatureParams,
                    thresholds: list[float]) -> DataFrame:
    """gold/viewer_features of D: viewers with any event in the history window before the end of D."""
    rows = states.filter((F.col("cutoff_us") == F.lit(cutoff_us)) & (F.col("n_events") > 0))
    rows = with_history_arrays(with_purchase_power(rows, thresholds), params)
    return rows.select(
        "viewer_id", "recency_days", "frequency_7d", "frequency_30d", "monetary_7d", "monetary_30d", "avg_price_paid",
        "price_tier", "watch_time_ms", "dwell_ms_total", "likes", "comments", "gifts", "n_events",
        F.timestamp_micros("last_us").alias("last_event_ts"),
        "hist_product", "hist_category", "hist_event", "hist_dwell", "hist_dt", "hist_len", "hist_host", "hist_hour",
        F.lit(as_of).alias("as_of_date"),
    )


def first_slots(stream_products: DataFrame, streams: DataFrame) -> DataFrame:
    """One row per (snapshot_date, product_id) on the schedule: its earliest slot that day.

    Columns snapshot_date, product_id, stream_id, host_id, slot_start (slot_start_ts, else
    the stream's start_ts), n_slots. The earliest slot wins (nulls last, ties by stream_id),
    so a product's context is the first time it is live; the scorer uses the same rows for
    the rankings it publishes, so training and serving see the same slot.
    """
    per_stream = streams.groupBy("snapshot_date", "stream_id").agg(
        F.min("start_ts").alias("_stream_start"), F.min("host_id").alias("host_id"))
    slots = (
        stream_products.filter(F.col("product_id").isNotNull())
        .join(per_stream, ["snapshot_date", "stream_id"], "left")
        .withColumn("slot_start", F.coalesce("slot_start_ts", "_stream_start"))
    )
    first = F.min(F.struct(F.col("slot_start").isNull().alias("_n"), F.col("slot_start"), F.col("stream_id"),
                           F.col("host_id")))
    return slots.groupBy("snapshot_date", "product_id").agg(first.alias("_f"), F.count(F.lit(1)).alias("n_slots")).select(
        "snapshot_date", "product_id", F.col("_f.stream_id").alias("stream_id"), F.col("_f.host_id").alias("host_id"),
        F.col("_f.slot_start").alias("slot_start"), F.col("n_slots").cast("long").alias("n_slots"))


def schedule_arrays(stream_products: DataFrame, streams: DataFrame, lookup: DataFrame, hosts: DataFrame) -> DataFrame:
    """(snapshot_date, sched, sched_host, sched_hour): each day's scheduled products (sorted
    distinct product ids) and, position by position, the host and hour of their first slot.

    Products outside the vocabulary are left out: an "unknown" candidate carries no signal.
    """
    item = F.struct(
        F.col("p_idx").cast("int").alias("p"),
        F.coalesce("h_idx", F.lit(UNK_IDX)).cast("int").alias("h"),
        hour_token(F.unix_micros("slot_start")).alias("hr"))
    ctx = (
        first_slots(stream_products, streams)
        .join(F.broadcast(lookup.select("product_id", "p_idx")), "product_id", "inner")
        .join(F.broadcast(hosts), "host_id", "left")
        .groupBy("snapshot_date").agg(F.array_sort(F.collect_list(item)).alias("_ctx"))
    )
    return ctx.select(
        "snapshot_date",
        F.transform("_ctx", lambda x: x["p"]).alias("sched"),
        F.transform("_ctx", lambda x: x["h"]).alias("sched_host"),
        F.transform("_ctx", lambda x: x["hr"]).alias("sched_hour"))


def candidate_positions(targets: Column, sched: Column, viewer: Column, cutoff_ts: Column, size: int) -> Column:
    """C candidates as 1-based positions in ``sched`` (0 = padding): the scheduled positives
    first, then scheduled products drawn by a hash of (viewer, cutoff, i), so a re-run draws
    the same ones.

    2C hash draws without the positives usually give C distinct products; on a small
    schedule the rest of the schedule follows, then repeats; no schedule gives all 0.
    Positions (not product ids) let the host and hour arrays be read at O(1) each.
    """
    n = F.size(sched)
    pos = F.filter(F.transform(targets, lambda p: F.array_position(sched, p).cast("int")), lambda i: i > 0)
    draws = F.transform(
        F.sequence(F.lit(1), F.lit(2 * size)),
        lambda i: (F.pmod(F.xxhash64(viewer, cutoff_ts, i), n.cast("long")) + 1).cast("int"),
    )
    fill = F.array_except(draws, pos)
    head = F.concat(pos, fill)
    full = F.when(F.size(head) >= size, F.slice(head, 1, size)).otherwise(
        F.slice(F.concat(head, F.array_except(F.sequence(F.lit(1), n), head), draws), 1, size))
    cand = F.when(n > 0, full).otherwise(F.array().cast("array<int>"))
    return _right_pad(cand, size, F.lit(0).cast("int"))


def at_positions(values: Column, positions: Column) -> Column:
    """values[i] for each 1-based position (0 gives padding 0)."""
    return F.transform(positions, lambda i: F.when(i > 0, F.element_at(values, i)).otherwise(F.lit(PAD_IDX)).cast("int"))


def candidates(targets: Column, sched: Column, viewer: Column, cutoff_ts: Column, size: int) -> Column:
    """The candidate product ids of candidate_positions (padding 0)."""
    return at_positions(sched, candidate_positions(targets, sched, viewer, cutoff_ts, size))


def is_test_viewer(viewer: Column, share: float) -> Column:
    """True for the viewers whose validation-cutoff rows are held out as split 'test'.

    Why a test half: training early-stops and calibrates on 'valid'; measuring the model on
    those same rows (as the gate does) would flatter it. A hash of the viewer id alone keeps
    the assignment stable across nights, so one viewer is always on the same side.
    """
    return F.pmod(F.xxhash64(viewer), F.lit(_TEST_BUCKETS)) < F.lit(int(round(share * _TEST_BUCKETS)))


def training_examples(states: DataFrame, cutoffs: list[tuple[int, str]], schedules: DataFrame, as_of: dt.date,
                      params: FeatureParams, thresholds: list[float]) -> DataFrame:
    """gold/training_examples of D: (viewer, cutoff) rows with >= 1 history event in the 7 days before.

    Splits: 'train' (cutoffs whose target day ends by D 00:00), and the validation cutoff's
    rows divided by viewer into 'valid' (early stopping, calibration) and 'test' (evaluate,
    the promotion gate), ``features.test_share`` of the viewers in 'test'.
    """
    split_of = F.create_map(*[x for c, s in cutoffs for x in (F.lit(c).cast("long"), F.lit(s))])
    rows = states.filter(F.col("cutoff_us").isin([c for c, _ in cutoffs]) & (F.col("n_hist_7d") > 0))
    rows = with_history_arrays(with_purchase_power(rows, thresholds), params)
    T_, C = params.target_size, params.cand_size
    tgt = F.array_distinct(F.transform(F.col("tgt"), lambda x: x["p"]))  # first-time order kept
    sched_date = F.to_date(F.timestamp_micros("cutoff_us"))
    rows = (
        rows.withColumn("cutoff_ts", F.timestamp_micros("cutoff_us"))
        .withColumn("sched_date", sched_date)
        .join(F.broadcast(schedules.withColumnRenamed("snapshot_date", "sched_date")), "sched_date", "left")
        .withColumn("sched", F.coalesce("sched", F.array().cast("array<int>")))
        .withColumn("_t", F.slice(tgt, 1, T_))
        .withColumn("target_products", _right_pad(F.col("_t"), T_, F.lit(PAD_IDX).cast("int")))
        .withColumn("target_product", F.col("target_products")[0].cast("int"))
        .withColumn("_cpos", candidate_positions(F.col("_t"), F.col("sched"), F.col("viewer_id"), F.col("cutoff_ts"), C))
        .withColumn("cand_products", at_positions(F.col("sched"), F.col("_cpos")))
        .withColumn("cand_host", at_positions(F.col("sched_host"), F.col("_cpos")))
        .withColumn("cand_hour", at_positions(F.col("sched_hour"), F.col("_cpos")))
        .withColumn("split", split_of[F.col("cutoff_us")])
        .withColumn("split", F.when((F.col("split") == "valid") & is_test_viewer(F.col("viewer_id"), params.test_share),
                                    F.lit("test")).otherwise(F.col("split")))
    )
    return rows.select(
        "viewer_id", "cutoff_ts", "hist_product", "hist_category", "hist_event", "hist_dwell", "hist_dt", "hist_len",
        "hist_host", "hist_hour", "pp_features", "target_product", "target_products", "cand_products", "cand_host",
        "cand_hour", "label_purchase", "split",
        F.lit(as_of).alias("as_of_date"),
    )


def price_thresholds(catalog: DataFrame) -> list[float]:
    """Catalog list-price quintile boundaries (4 numbers; the only values brought to the driver)."""
    row = catalog.filter(F.col("list_price").isNotNull()).agg(
        F.percentile(F.col("list_price"), [0.2, 0.4, 0.6, 0.8]).alias("q")).first()
    return [float(q) for q in row["q"]] if row is not None and row["q"] is not None else []


# ----------------------------------------------------------------------------- the stage

def _files_for(rows: int) -> int:
    return max(1, min(MAX_FILES, math.ceil(rows / ROWS_PER_FILE)))


def _catalog_snapshot(ctx: Context, as_of: dt.date, run: StageRun) -> tuple[DataFrame, dt.date]:
    """The catalog of D, else the latest snapshot before D (catalog files can skip a day)."""
    table = ctx.table(PRODUCTS)
    version = table.version()
    run.read(PRODUCTS, version)
    products = table.read(version=version)
    latest = products.filter(F.col("snapshot_date") <= F.lit(as_of)).agg(F.max("snapshot_date").alias("d")).first()
    if latest is None or latest["d"] is None:
        raise MissingInputError(f"{PRODUCTS}: no catalog snapshot on or before {as_of} (run ingest for {as_of})")
    snap = latest["d"]
    if snap != as_of:
        log.warning("features %s: no catalog snapshot of %s, using the one of %s", as_of, as_of, snap)
    return latest_catalog(products.filter(F.col("snapshot_date") == F.lit(snap))), snap


def build_features(ctx: Context, date: dt.date) -> dict[str, Any]:
    """Compute and publish gold vocabularies, viewer features and training examples of `date`."""
    params = FeatureParams.from_config(ctx.cfg)
    with stage_run(ctx, "features", date) as run:
        lo, hi = silver_window(date, params)
        silver_t = ctx.table(SILVER)
        silver_v = silver_t.version()
        run.read(SILVER, silver_v)
        silver = known_by(silver_t.read(version=silver_v), date).filter(F.col("event_date").between(F.lit(lo), F.lit(hi)))
        # One cheap probe: rows for D itself imply a non-empty window, and features of D
        # without D's events would silently describe yesterday (clean has not run).
        if silver.filter(F.col("event_date") == F.lit(date)).limit(1).count() == 0:
            raise MissingInputError(
                f"{SILVER}: no rows for event_date {date} in the window [{lo}, {hi}] (run clean for {date} first)")
        window = [lo + dt.timedelta(days=n) for n in range((hi - lo).days + 1)]
        cleaned = {r["run_date"] for r in successful_runs(ctx, "clean", window)} | {date}  # D's rows: just seen
        gaps = uncleaned_days(cleaned, lo, hi)

        catalog, snap = _catalog_snapshot(ctx, date, run)
        catalog = catalog.persist(StorageLevel.MEMORY_AND_DISK)
        vocab = build_vocabularies(catalog, silver, date).persist(StorageLevel.MEMORY_AND_DISK)
        lookup = product_lookup(vocab, catalog).persist(StorageLevel.MEMORY_AND_DISK)
        hosts = host_lookup(vocab).persist(StorageLevel.MEMORY_AND_DISK)
        thresholds = price_thresholds(catalog)

        train_cuts, left_out = cutoffs_clear_of(training_cutoffs(date, params), gaps)
        if gaps:
            redo = f"`streamrank nightly --date {date} --from features`"
            log.warning("features %s: clean has not published %s (no successful clean run in ops/job_runs); "
                        "%d training cutoff(s) whose target day is missing are left out, histories across the gap "
                        "are shorter. Backfill: `streamrank ingest --date X` and `streamrank clean --date X` for each "
                        "of those days, then %s", date, day_ranges(gaps), len(left_out), redo)
            # on the summary line, in ops/job_runs and in the night's report, not only in the log
            run.message = (f"not cleaned: {day_ranges(gaps)} ({len(left_out)} training cutoff(s) left out); "
                           f"backfill with ingest and clean for those dates, then {redo}")
        serve_cut = feature_cutoff_us(date)
        all_cuts = [c for c, _ in train_cuts] + [serve_cut]
        ts_lo = min(all_cuts) - params.lookback_days * DAY_US
        events = encode_events(
            silver.filter((F.unix_micros("event_ts") >= F.lit(ts_lo)) & (F.unix_micros("event_ts") < F.lit(serve_cut))),
            lookup, hosts, params)
        states = cutoff_states(slot_summaries(events, params), all_cuts, params).persist(StorageLevel.MEMORY_AND_DISK)

        sp_t = ctx.table(STREAM_PRODUCTS)
        sp_v = sp_t.version()
        run.read(STREAM_PRODUCTS, sp_v)
        sched_dates = sorted({dt.date(1970, 1, 1) + dt.timedelta(microseconds=c) for c, _ in train_cuts})
        st_t = ctx.table(STREAMS)
        st_v = st_t.version()
        run.read(STREAMS, st_v)
        schedules = schedule_arrays(sp_t.read(version=sp_v).filter(F.col("snapshot_date").isin(sched_dates)),
                                    st_t.read(version=st_v).filter(F.col("snapshot_date").isin(sched_dates)), lookup, hosts)
        schedules = schedules.persist(StorageLevel.MEMORY_AND_DISK)
        have_sched = {r["snapshot_date"] for r in schedules.select("snapshot_date").collect()}
        missing_sched = [d for d in sched_dates if d not in have_sched]
        if missing_sched:
            log.warning("features %s: no schedule (bronze/stream_products) for %s: those cutoffs get 0 candidates",
                        date, ", ".join(map(str, missing_sched)))

        # The three tables' files are staged one after another and committed together at
        # the end (publish.py): a vocabulary never goes out without the examples built on it.
        try:
            with StagedTables(ctx, "features", run) as out:
                commit = {"stage": "features", "run_id": ctx.run_id, "as_of_date": str(date)}
                where = {"as_of_date": date}
                out.stage(VOCAB, vocab.coalesce(1), where, commit)

                vf = viewer_features(states, serve_cut, date, params, thresholds)
                n_viewers = states.filter((F.col("cutoff_us") == serve_cut) & (F.col("n_events") > 0)).count()
                out.stage(VIEWER_FEATURES, vf.repartition(_files_for(n_viewers)), where, commit)

                te = training_examples(states, train_cuts, schedules, date, params, thresholds)
                per_cut = (
                    states.filter(F.col("cutoff_us").isin([c for c, _ in train_cuts]) & (F.col("n_hist_7d") > 0))
                    .groupBy("cutoff_us").agg(F.count(F.lit(1)).alias("n"), F.sum("label_purchase").alias("buyers"),
                                              F.count_if(is_test_viewer(F.col("viewer_id"), params.test_share)).alias("test"))
                    .collect()
                )
                split_of = dict(train_cuts)
                n_train = sum(r["n"] for r in per_cut if split_of[r["cutoff_us"]] == "train")
                n_test = sum(r["test"] for r in per_cut if split_of[r["cutoff_us"]] == "valid")
                n_valid = sum(r["n"] for r in per_cut if split_of[r["cutoff_us"]] == "valid") - n_test
                buyers = sum(r["buyers"] or 0 for r in per_cut)
                out.stage(TRAINING, te.repartition(_files_for(n_train + n_valid + n_test)), where, commit)
                out.publish()
        finally:
            for df in (states, schedules, hosts, lookup, vocab, catalog):
                df.unpersist()

        run.metrics.update({
            "viewers": n_viewers, "train_rows": n_train, "valid_rows": n_valid, "test_rows": n_test,
            "purchase_rate": round(buyers / max(1, n_train + n_valid + n_test), 4),
            "catalog_snapshot": str(snap), "cutoffs": len(train_cuts),
            "cutoffs_without_schedule": len(missing_sched), "silver_window": f"{lo}..{hi}",
            "days_not_cleaned": len(gaps), "cutoffs_left_out": len(left_out),
        })
        return dict(run.metrics, versions_read=dict(run.versions_read), versions_written=dict(run.versions_written))


def run(ctx: Context, args: argparse.Namespace) -> int:
    """CLI entry point: `streamrank features --date D`."""
    date = args.date if isinstance(args.date, dt.date) else parse_date(str(args.date))
    build_features(ctx, date)
    return 0


__all__ = [
    "EVENT_TYPES", "PP_FEATURES", "TEST_SHARE", "TRAIN_DAYS", "VOCAB_KINDS", "FeatureParams", "at_positions",
    "build_features", "build_vocabularies", "candidate_positions", "candidates", "cutoff_states", "dwell_bucket",
    "encode_events", "event_index", "feature_cutoff_us", "first_slots", "host_lookup", "hour_token",
    "is_test_viewer", "known_by", "latest_catalog", "pp_features_expr", "price_thresholds", "product_lookup", "run",
    "schedule_arrays", "silver_window", "slot_summaries", "training_cutoffs", "training_examples", "viewer_features",
    "with_history_arrays", "with_purchase_power",
]
