"""Ingest: the landing files of date D -> bronze tables, exactly once (DESIGN sections 4, 5, 9).

What a run for D reads and writes
---------------------------------
- ``events/date=D/*.jsonl[.gz]`` -> ``bronze/viewer_events`` (partition ``ingest_date=D``).
  Every non-empty line becomes exactly one row: the landing fields as text where the line
  is a JSON object, ``parse_ok=false`` and null fields where it is not, and always
  ``raw_line``, ``source_file`` (relative to the landing root), ``line_number`` (1-based
  within its file), ``ingest_run_id``, ``ingested_at`` and ``ingest_date``.
- ``catalog/products_D.csv``, ``schedule/streams_D.csv``, ``schedule/stream_products_D.csv``
  -> ``bronze/products``, ``bronze/streams``, ``bronze/stream_products`` with
  ``snapshot_date=D``, typed per schemas/tables; and the schedule files of D+1 when they
  are there (``snapshot_date=D+1``), because scoring D needs tomorrow's streams (the
  catalog of D+1 waits for its own run). A snapshot is written as a replace of its
  partition, so ingesting it again never duplicates it. These are small dimension files
  (thousands of rows): they are parsed with Python's csv module (strict RFC 4180 quoting,
  so every bad row is reported with its line; line_number is the line a record starts
  on, the header being line 1) and written through the table layer from Arrow.
- Corrections: landing files are immutable, so a corrected snapshot lands as a new file
  beside the original, ``products_D.rev1.csv`` (then ``.rev2``, ...), holding the whole
  snapshot again. The newest revision is the one read (``revision_number``); a re-run for
  D replaces the partition with it, and clean can then replay the rows it quarantined as
  unknown_product or unknown_stream. Revisions already ingested stay immutable; one that
  a newer revision superseded before it was ingested is ignored (and counted so).
- ``ops/ingest_log``: one row per committed landing file (path, size, sha256, rows,
  target table and version, run id, commit time).

Exactly-once: bronze commit metadata, then the log, reconciled at start
-----------------------------------------------------------------------
The bronze tables and ops/ingest_log are separate Delta tables, so no single commit can
cover both. Each bronze commit therefore carries, in its Delta commit metadata
(``userMetadata``), the list of landing files it contains (path, kind, size, sha256) and
the ingest run and date. The ingest_log append comes after the bronze commits. Every run
starts by reconciling: it walks the recent history of the four bronze tables and any file
named in an ingest commit but absent from ingest_log is written into ingest_log (its row
count read from that commit's add actions). Only then is "new" decided: a file is new
when its path is not in ingest_log. So:

- a crash before a bronze commit leaves only invisible Parquet orphans (the table layer)
  and the file is still new: the re-run ingests it once;
- a crash after a bronze commit and before the ingest_log append is repaired by the next
  run's reconcile: the file is not ingested again (the repair rows are merged on path, so
  two runs repairing at once still log each file once);
- a re-run with nothing new commits nothing (every table keeps its version).

The alternative, Delta's idempotent ``txn`` action, needs a monotonically increasing
version per writer id; "the set of files of a date" has no natural such number once late
files arrive, and the metadata also answers "which commit holds this file".
Two ingest runs of one date at the same time (the nightly holds a warehouse lock, but an
Airflow retry or a run by hand does not) both find the same files new. Delta sees no
conflict between two appends, so each bronze commit carries a guard (`CommitGuard`): it
refuses, with nothing of it committed, if an ingest commit made after the bronze version
this run read names one of its files. The loser exits 1; its re-run skips what is logged.

Order of work: everything that can reject the input runs before the first commit
(checksums and gzip validation in Python threads while the CSVs are parsed); then the
snapshot tables are written in threads beside the events (independent tables; a failure
part-way is just another crash for reconcile); then the ingest_log append.

Rows per file come for free: each landing file is read as its own Spark partition, so
each Parquet file the write produces holds rows of one landing file, and the add
action's statistics (numRecords, min = max source_file) give the count. When stats
cannot attribute (e.g. delta-spark truncates long string stats) one small groupBy over
the rows of the commit does.

Line numbers without a Python UDF
---------------------------------
The new event files are read in one ``spark.read.text`` scan while
``spark.sql.files.maxPartitionBytes`` and ``openCostInBytes`` are set very large (and
``maxPartitionNum`` unset), so every file is one unsplit partition of its own (checked at
planning time: N files must plan as N partitions, else an error, never a wrong number).
``monotonically_increasing_id()`` is ``(partition index << 33) + position in the
partition``; minus ``spark_partition_id() << 33`` it is the 0-based position of the line in
its file. Both are computed in the projection right on the scan, before any filter, so
skipped empty lines still count. ``source_file`` is ``input_file_name()`` mapped to the
landing-relative path (the URIs Spark will report are taken from ``inputFiles()`` and
checked against the files asked for; an unmapped name fails the job). One scan rather
than a union of per-file scans also keeps the partitioned write free of a sort. The
price: one task per file, so parallelism is the number of files of the day (the
platform drops several per day). High-cardinality columns (raw_line, event_id, ...) are
written without Parquet dictionaries (``_NO_DICTIONARY``): about 15% less write CPU.

Line and JSON semantics
-----------------------
- A line is the bytes up to ``\\n`` (``lineSep="\\n"``, so a stray ``\\r`` never splits a
  line); one trailing ``\\r`` (CRLF files) is dropped. A line that is then empty is not a
  row (it holds no data) but still counts for the numbering of the lines after it.
- ``from_json`` into an all-string schema with a corrupt-record column: strings are kept,
  integers and booleans as their JSON text (``"dwell_ms": 1200`` -> ``"1200"``), objects and
  arrays as their JSON text, a value of the wrong JSON type as its text. Floats are
  rendered by Jackson as doubles (``15.10`` -> ``"15.1"``, ``1e3`` -> ``"1000.0"``): the same
  number, while ``raw_line`` keeps the exact bytes. ``parse_ok`` is false for a line that
  is not valid JSON, for JSON that is not an object (``[1]``, ``123``, ``null``), and for an
  object followed by trailing text (Jackson would stop at the first object); single
  quotes are not accepted. Fields are null when ``parse_ok`` is false. A key that occurs
  twice in one object keeps its last value (Jackson's order); ``raw_line`` keeps both.
  Clean marks an object or array in an id or name field ``bad_type`` (clean.TEXT_FIELDS).
- Invalid UTF-8: Spark's text reader keeps the raw bytes; the JSON parser decodes them
  with U+FFFD replacement characters and ``raw_line`` is stored through
  ``make_valid_utf8`` (same replacement), so every bronze string is valid UTF-8 for any
  Delta reader. Such a line is otherwise parsed normally (parse_ok true).

Which files
-----------
- Event files are the ``*.jsonl`` and ``*.jsonl.gz`` regular files of the date folder not
  starting with ``.`` or ``_`` (other names are ignored and counted). Zero-byte files are
  skipped and not logged: a file still being written may be zero bytes, and it is picked
  up by a later run once it has data.
- No date folder, or a folder with no event file holding data: MissingInputError (exit
  5) naming the folder, unless ingest_log already holds files of that folder (a re-run
  after landing retention removed them is a no-op). The same for the catalog and
  schedule files of D; the schedule of D+1 is optional.
- Late files: a file that appears in the folder of D after D was ingested is picked up by
  the next run: a re-run for D, or the run for any of the next ``LATE_LOOKBACK_DAYS`` dates
  (which sweeps the already-ingested folders of the days before it for unlogged files and
  ingests them with its own ingest_date, so the clean stage of that date sees them).
- A logged file whose sha256 (folder of D) or size (look-back folders, which are not
  re-hashed every night) changed: ChangedFileError (exit 1) naming it; nothing committed.
- A corrupt gzip file (validated with Python's gzip in a streaming loop while the sha256
  is computed, before any commit), a CSV without the required header columns, or a CSV
  row with the wrong number of fields or an unparseable timestamp, date or price:
  CorruptInputError (exit 5) naming the file and lines; nothing committed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import signal
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from streamrank.context import Context, StageRun, stage_run
from streamrank.delta import CommitGuard, DeltaTable, InjectedFault, arrow_schema
from streamrank.errors import MissingInputError, StreamrankError
from streamrank.schemas import table_spec
from streamrank.spark import session_settings, without_dictionaries

log = logging.getLogger(__name__)

EVENTS, PRODUCTS, STREAMS, STREAM_PRODUCTS = "events", "products", "streams", "stream_products"
TARGETS: dict[str, str] = {
    EVENTS: "bronze/viewer_events",
    PRODUCTS: "bronze/products",
    STREAMS: "bronze/streams",
    STREAM_PRODUCTS: "bronze/stream_products",
}
INGEST_LOG = "ops/ingest_log"
# kind -> (landing sub-folder, file name pattern of a date)
CSV_FILES: dict[str, tuple[str, str]] = {
    PRODUCTS: ("catalog", "products_{}.csv"),
    STREAMS: ("schedule", "streams_{}.csv"),
    STREAM_PRODUCTS: ("schedule", "stream_products_{}.csv"),
}
EVENT_SUFFIXES = (".jsonl", ".jsonl.gz")
EVENT_META = ("raw_line", "parse_ok", "source_file", "line_number", "ingest_run_id", "ingested_at", "ingest_date")
CSV_META = ("source_file", "line_number", "ingest_run_id", "snapshot_date")
LATE_LOOKBACK_DAYS = 3
HISTORY_SCAN = 500  # bronze commits looked at by reconcile: far more than can be unlogged
FAULT_AFTER_BRONZE_ENV = "STREAMRANK_FAULT_AFTER_BRONZE_COMMIT"  # "raise" or "kill", for crash tests
META_STAGE = "ingest"

_CORRUPT = "_corrupt_record"
_HUGE = 1 << 45  # bytes: larger than any landing file, small enough that 2x does not overflow
_ID_SHIFT = 33  # monotonically_increasing_id: partition index in the bits above 33
_CHUNK = 1 << 20
_NO_DICTIONARY = ("raw_line", "event_id", "session_id", "event_ts", "device_id", "ip")
_GLOB_CHARS = set("{}[]*?\\")


class CorruptInputError(MissingInputError):
    """A landing file cannot be read as what it claims to be (exit 5, like a missing input)."""


class ChangedFileError(StreamrankError):
    """A landing file was already ingested and has changed since: landing files are immutable."""


@dataclass
class LandingFile:
    """One landing file and what ingest needs to know about it."""

    kind: str
    rel: str  # path relative to the landing root, POSIX separators
    path: Path
    size: int
    snapshot_date: dt.date | None = None
    checksum: str | None = None

    @property
    def gz(self) -> bool:
        return self.rel.endswith(".gz")


# ----------------------------------------------------------------------------- entry points

def run(ctx: Context, args: argparse.Namespace) -> int:
    """CLI entry point (`streamrank ingest --date D`); errors carry their exit code."""
    ingest(ctx, args.date)
    return 0


def ingest(ctx: Context, date: dt.date) -> dict[str, Any]:
    """Ingest the landing files of `date` into bronze, exactly once; return a summary.

    The summary has the new, skipped, empty and repaired files, rows per table and the
    versions written. Raises MissingInputError / CorruptInputError (exit 5) or
    ChangedFileError (exit 1) before anything is committed.
    """
    with stage_run(ctx, "ingest", date) as run:
        return _ingest(ctx, date, run)


def _ingest(ctx: Context, date: dt.date, run: StageRun) -> dict[str, Any]:
    landing = ctx.cfg.landing
    log_table = ctx.table(INGEST_LOG)
    tables = {kind: ctx.table(name) for kind, name in TARGETS.items()}
    run.read(INGEST_LOG, log_table.version())
    read_at: dict[str, int] = {}  # what "new" is decided against; every bronze commit is guarded from here
    for name, table in tables.items():
        read_at[name] = table.version() or 0
        run.read(TARGETS[name], read_at[name])

    seconds: dict[str, float] = {}
    run.metrics["seconds"] = seconds
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock, 3)
        clock = now

    logged = _read_log(log_table)
    repaired = _reconcile(ctx.spark, tables, log_table, logged)
    lap("reconcile")
    if repaired:
        run.wrote(INGEST_LOG, log_table.version())
        log.warning("ingest: repaired %d ingest_log rows of earlier runs' bronze commits", len(repaired))

    files, empty, ignored = _discover(landing, date, logged)
    new = [f for f in files if f.rel not in logged]
    old = [f for f in files if f.rel in logged]
    summary: dict[str, Any] = {
        "date": date.isoformat(), "run_id": ctx.run_id, "files_new": len(new), "files_skipped": len(old),
        "files_empty": len(empty), "files_ignored": len(ignored), "files_repaired": len(repaired),
        "bytes_new": sum(f.size for f in new), "rows": {}, "versions": {}, "new_files": [f.rel for f in new],
    }
    run.metrics.update({k: v for k, v in summary.items() if k.startswith("files_") or k == "bytes_new"})

    spark = ctx.spark
    ingested_at = dt.datetime.now(dt.UTC)
    batch = max(1, int(ctx.cfg.get("ingest.max_files_per_commit", 64) or 64))
    commits: list[tuple[str, int, list[LandingFile]]] = []  # (kind, version, files)
    with _file_per_partition(spark), ThreadPoolExecutor(max_workers=4) as pool:  # the pool drains first
        # Validate everything before the first commit: checksums and gzip streams in
        # Python threads while the (small) catalog and schedule CSVs are parsed.
        scan = pool.submit(_scan_files, new, old, logged, date)
        csv_rows: dict[str, tuple[list[tuple[Any, ...]], list[LandingFile]]] = {}
        for kind in (PRODUCTS, STREAMS, STREAM_PRODUCTS):
            kind_files = [f for f in new if f.kind == kind]
            if kind_files:
                csv_rows[kind] = ([row for f in kind_files for row in _read_csv(f, ctx.run_id)], kind_files)
        scan.result()
        lap("checks")
        if not new:
            run.message = "nothing new to ingest"
            return summary

        # Then the bronze writes, the snapshots in threads beside the events: the tables
        # are independent, and a failure part-way is what reconcile is for.
        def write_snapshot(kind: str) -> tuple[str, int, list[LandingFile]]:
            rows, kind_files = csv_rows[kind]
            schema = arrow_schema(tables[kind].spec.schema)
            columns = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
            frame = spark.createDataFrame(pa.Table.from_arrays(
                [pa.array(col, type=fld.type) for col, fld in zip(columns, schema, strict=True)], schema=schema))
            dates = sorted({f.snapshot_date for f in kind_files})
            res = tables[kind].overwrite(frame, where={"snapshot_date": dates},
                                         commit_info=_commit_meta(ctx.run_id, date, kind_files),
                                         guard=_not_committed_since(read_at[kind], kind_files, date))
            return kind, res.version, kind_files

        snapshot_jobs = [pool.submit(write_snapshot, kind) for kind in csv_rows]
        event_files = sorted((f for f in new if f.kind == EVENTS), key=lambda f: f.rel)
        for i in range(0, len(event_files), batch):
            chunk = event_files[i:i + batch]
            frame = _event_frame(spark, chunk, ctx.run_id, ingested_at, date)
            res = tables[EVENTS].append(frame, commit_info=_commit_meta(ctx.run_id, date, chunk),
                                        guard=_not_committed_since(read_at[EVENTS], chunk, date))
            commits.append((EVENTS, res.version, chunk))
        commits += [job.result() for job in snapshot_jobs]
        lap("bronze")
    for kind, version, _ in commits:
        run.wrote(TARGETS[kind], version)

    _maybe_fail_after_bronze()
    rows: list[dict[str, Any]] = []
    for kind, version, kind_files in commits:
        counts, committed_at = _commit_rows(tables[kind], version, [f.rel for f in kind_files], ctx.run_id)
        for f in kind_files:
            rows.append(_log_row(date, f.kind, f.rel, f.size, f.checksum, counts.get(f.rel, 0), TARGETS[kind],
                                 version, ctx.run_id, committed_at))
    run.wrote(INGEST_LOG, log_table.append_rows(rows))
    lap("log")

    per_table: dict[str, int] = {}
    for r in rows:
        per_table[r["target_table"]] = per_table.get(r["target_table"], 0) + r["rows"]
    summary["rows"] = per_table
    summary["versions"] = dict(run.versions_written)
    run.metrics["lines"] = per_table.get(TARGETS[EVENTS], 0)
    run.metrics.update({f"rows_{name.split('/')[1]}": n for name, n in per_table.items() if name != TARGETS[EVENTS]})
    return summary


# ----------------------------------------------------------------------------- discovery

def _discover(landing: Path, date: dt.date, logged: dict[str, dict[str, Any]]
              ) -> tuple[list[LandingFile], list[str], list[str]]:
    """The landing files a run for `date` considers: (files with data, zero-byte, ignored)."""
    files: list[LandingFile] = []
    empty: list[str] = []
    ignored: list[str] = []

    def folder_logged(rel_folder: str) -> bool:
        return any(p.startswith(rel_folder + "/") for p in logged)

    rel_folder = f"events/date={date.isoformat()}"
    folder = landing / rel_folder
    if not folder.is_dir():
        if not folder_logged(rel_folder):
            raise MissingInputError(f"no landing folder for {date}: {folder} does not exist")
    else:
        found, e, ign = _event_files(landing, folder)
        # a logged file that is now zero bytes has changed, it is not "empty"
        found += [LandingFile(EVENTS, rel, landing / rel, 0) for rel in e if rel in logged]
        empty += [rel for rel in e if rel not in logged]
        ignored += ign
        if not found and not folder_logged(rel_folder):
            detail = f" ({len(e)} zero-byte files skipped)" if e else ""
            raise MissingInputError(f"landing folder {folder} has no event file (*.jsonl, *.jsonl.gz) with data{detail}")
        files += found
    # late files in the folders of the days before, once those days have been ingested
    for back in range(1, LATE_LOOKBACK_DAYS + 1):
        day = date - dt.timedelta(days=back)
        rel_prev = f"events/date={day.isoformat()}"
        if (landing / rel_prev).is_dir() and folder_logged(rel_prev):
            found, _, _ = _event_files(landing, landing / rel_prev)
            files += [f for f in found if f.rel not in logged or int(logged[f.rel]["size"] or -1) != f.size]

    for kind, (sub, pattern) in CSV_FILES.items():
        days = [(date, True)] + ([(date + dt.timedelta(days=1), False)] if sub == "schedule" else [])
        for day, required in days:
            rel = f"{sub}/{pattern.format(day.isoformat())}"
            revisions = snapshot_revisions(landing, rel)
            for _, rel_i in revisions:
                _check_name(rel_i)
            # the newest revision is the snapshot, unless a newer one was ingested already
            # (its file since removed by landing retention): an older one never takes over
            newest_logged = max((n for n in (revision_number(rel, r) for r in logged) if n is not None), default=-1)
            latest = revisions[-1] if revisions and revisions[-1][0] >= newest_logged else None
            for n, r in revisions:
                f = LandingFile(kind, r, landing / r, (landing / r).stat().st_size, snapshot_date=day)
                if (n, r) == latest or r in logged:  # an ingested revision stays immutable (re-hashed)
                    files.append(f)
                else:
                    ignored.append(r)
                    log.warning("ingest: ignoring %s (superseded by a later revision of the snapshot)", r)
            if not revisions and required and newest_logged < 0:
                raise MissingInputError(f"required landing file for {date} is missing: {landing / rel}")
    return files, empty, ignored


def revision_number(rel: str, candidate: str) -> int | None:
    """Which revision of the catalog or schedule file `rel` the landing path `candidate` is, if any.

    Landing files are immutable, so a corrected snapshot of day X lands as a new file next
    to the original: ``products_X.rev1.csv``, ``.rev2.csv``, ... each the whole snapshot,
    not a difference. The original is revision 0; the highest one replaces the
    snapshot_date=X partition.
    """
    if candidate == rel:
        return 0
    stem = rel.removesuffix(".csv")
    m = re.fullmatch(re.escape(stem) + r"\.rev([1-9]\d*)\.csv", candidate)
    return int(m.group(1)) if m else None


def snapshot_revisions(landing: Path, rel: str) -> list[tuple[int, str]]:
    """(revision, path) of the landing files that are `rel` or a revision of it, oldest first."""
    folder = (landing / rel).parent
    if not folder.is_dir():
        return []
    stem = Path(rel).name.removesuffix(".csv")
    found = []
    for path in folder.glob(f"{stem}*.csv"):
        other = path.relative_to(landing).as_posix()
        n = revision_number(rel, other)
        if n is not None and path.is_file():
            found.append((n, other))
    return sorted(found)


def _event_files(landing: Path, folder: Path) -> tuple[list[LandingFile], list[str], list[str]]:
    found, empty, ignored = [], [], []
    for path in sorted(folder.iterdir()):
        rel = path.relative_to(landing).as_posix()
        if path.name.startswith((".", "_")) or not path.is_file():
            continue
        if not path.name.endswith(EVENT_SUFFIXES):
            ignored.append(rel)
            log.warning("ingest: ignoring %s (not *.jsonl or *.jsonl.gz)", path)
            continue
        size = path.stat().st_size
        if size == 0:
            empty.append(rel)
            continue
        _check_name(rel)
        found.append(LandingFile(EVENTS, rel, path, size))
    return found, empty, ignored


def _check_name(rel: str) -> None:
    """Spark treats glob characters in a path as a pattern: refuse them rather than misread."""
    bad = sorted(set(rel) & _GLOB_CHARS)
    if bad:
        raise CorruptInputError(f"landing file name {rel!r} contains {bad}, which Spark would read as a glob pattern")


# ----------------------------------------------------------------------------- checksums

class _HashingReader(io.RawIOBase):
    """A read-only stream that feeds every byte it passes on into a sha256."""

    def __init__(self, raw: BinaryIO, digest: Any) -> None:
        self.raw = raw
        self.digest = digest
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.size += n
        return n or 0


def _digest(f: LandingFile, validate_gzip: bool) -> tuple[int, str]:
    """(size, sha256) of the file's bytes; a gzip file is also decompressed to check it.

    One streaming pass, constant memory: hashlib and zlib release the GIL on large buffers
    so files are hashed in parallel threads. The decompressed bytes are discarded.
    """
    digest = hashlib.sha256()
    with open(f.path, "rb") as fh:
        reader = _HashingReader(fh, digest)
        if validate_gzip and f.gz:
            try:
                with gzip.GzipFile(fileobj=io.BufferedReader(reader, _CHUNK), mode="rb") as gz:
                    while gz.read(_CHUNK * 4):
                        pass
            except (OSError, EOFError, zlib.error) as exc:
                raise CorruptInputError(
                    f"corrupt gzip landing file {f.rel} ({f.path}): {type(exc).__name__}: {exc}; nothing was committed"
                ) from None
        while reader.read(_CHUNK):  # whatever gzip did not need still belongs to the checksum
            pass
    return reader.size, digest.hexdigest()


def _scan_files(new: list[LandingFile], old: list[LandingFile], logged: dict[str, dict[str, Any]], date: dt.date) -> None:
    """Checksum new files (validating gzip) and check logged files of D for changes."""
    folder = f"events/date={date.isoformat()}/"
    rehash = [f for f in old if f.kind != EVENTS or f.rel.startswith(folder)]
    jobs = [(f, True) for f in new] + [(f, False) for f in rehash]
    with ThreadPoolExecutor(max_workers=min(4, max(1, os.cpu_count() or 1), max(1, len(jobs)))) as pool:
        results = list(pool.map(lambda job: _digest(*job), jobs))
    for (f, _), (size, checksum) in zip(jobs, results, strict=True):
        f.size, f.checksum = size, checksum
    changed = []
    for f in old:
        entry = logged[f.rel]
        if (f.checksum is not None and f.checksum != entry["checksum"]) or f.size != entry["size"]:
            changed.append(
                f"{f.rel} (ingested {entry['ingest_date']} by run {entry['ingest_run_id']}: size {entry['size']}, "
                f"sha256 {str(entry['checksum'])[:12]}; now size {f.size}" + (f", sha256 {f.checksum[:12]})" if f.checksum else ")")
            )
    if changed:
        raise ChangedFileError(
            "landing files changed after they were ingested (landing files are immutable; drop a new file "
            "instead, for a catalog or schedule correction NAME.rev1.csv beside NAME.csv): " + "; ".join(changed)
            + "; nothing was committed"
        )


# ----------------------------------------------------------------------------- Spark reads

@contextmanager
def _file_per_partition(spark: SparkSession) -> Iterator[None]:
    """While active, every file a scan reads is one unsplit partition of its own.

    The settings are read when a query is planned and run, so the writes that use the
    frames happen inside this block too; the previous values are restored after. The
    Parquet per-column options set here apply to the bronze writes only.
    """
    with session_settings(spark, {
        "spark.sql.files.maxPartitionBytes": str(_HUGE),
        "spark.sql.files.openCostInBytes": str(_HUGE),
        "spark.sql.files.maxPartitionNum": None,  # a cap would coalesce files
        **without_dictionaries(_NO_DICTIONARY),
    }):
        yield


def _lines(spark: SparkSession, files: Sequence[LandingFile]) -> DataFrame:
    """The files' lines: value (one trailing CR dropped), 1-based line_number, source_file.

    One scan over all the files, each its own partition (checked at planning time), so a
    partitioned write above it needs no sort. Empty lines are dropped after numbering.
    Must be planned and run inside `_file_per_partition`.
    """
    raw = spark.read.option("lineSep", "\n").text([str(f.path) for f in files])
    parts = raw.rdd.getNumPartitions()
    if parts != len(files):
        raise StreamrankError(f"ingest: {len(files)} files were planned as {parts} partitions; line numbers would be wrong")
    value = F.col("value")
    numbered = raw.select(
        F.when(value.endswith("\r"), F.regexp_replace(value, "\r\\z", "")).otherwise(value).alias("value"),
        (F.monotonically_increasing_id() - F.shiftleft(F.spark_partition_id().cast("long"), _ID_SHIFT) + 1).alias("line_number"),
        _source_file(raw, files).alias("source_file"),
    )
    return numbered.filter(F.col("value") != "")


def _source_file(raw: DataFrame, files: Sequence[LandingFile]) -> Column:
    """input_file_name() -> the landing-relative path, exactly, or a failed job (never a guess).

    The names Spark reports are URIs (percent-encoded); they are matched to our files once
    on the driver from `inputFiles()`. When every URI is a common base + the relative path
    (the usual case) the column is a substring of it; otherwise a map lookup.
    """
    by_path = {os.path.normpath(f.path): f.rel for f in files}
    uris: dict[str, str] = {}
    for uri in raw.inputFiles():
        rel = by_path.get(os.path.normpath(unquote(urlparse(uri).path)))
        if rel is None:
            raise StreamrankError(f"ingest: Spark reads {uri}, which is not one of the landing files asked for")
        uris[uri] = rel
    if sorted(uris.values()) != sorted(by_path.values()):
        raise StreamrankError(f"ingest: Spark lists {sorted(uris)} for the files {sorted(by_path.values())}")
    name = F.input_file_name()
    unmapped = F.raise_error(F.concat(F.lit("ingest: unmapped input file "), name))
    bases = {uri[: len(uri) - len(rel)] for uri, rel in uris.items() if uri.endswith(rel)}
    if len(bases) == 1 and all(uri.endswith(rel) for uri, rel in uris.items()):
        base = bases.pop()
        return F.when(name.startswith(base), F.expr(f"substring(input_file_name(), {len(base) + 1})")).otherwise(unmapped)
    mapping = F.create_map(*[F.lit(x) for pair in uris.items() for x in pair])
    return F.coalesce(F.try_element_at(mapping, name), unmapped)


def _event_frame(spark: SparkSession, files: Sequence[LandingFile], run_id: str, ingested_at: dt.datetime,
                 date: dt.date) -> DataFrame:
    """bronze/viewer_events rows of the given files (lazy; one partition per file)."""
    spec = table_spec(TARGETS[EVENTS])
    fields = [c for c in spec.schema.fieldNames() if c not in EVENT_META]
    schema = T.StructType([T.StructField(c, T.StringType()) for c in fields] + [T.StructField(_CORRUPT, T.StringType())])
    lines = _lines(spark, files)
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT, "allowSingleQuotes": "false"}
    parsed = lines.select("*", F.from_json("value", schema, options).alias("j"))
    ends_with_brace = F.col("value").endswith("}") | F.col("value").rlike(r"\}\s*\z")  # the regex only when needed
    ok = F.col("j").isNotNull() & F.col(f"j.{_CORRUPT}").isNull() & ends_with_brace
    flagged = parsed.select("*", ok.alias("parse_ok"))
    return flagged.select(
        *[F.when(F.col("parse_ok"), F.col("j")[c]).alias(c) for c in fields],
        F.make_valid_utf8("value").alias("raw_line"),
        F.col("parse_ok"),
        F.col("source_file"),
        F.col("line_number"),
        F.lit(run_id).alias("ingest_run_id"),
        F.lit(ingested_at).cast("timestamp").alias("ingested_at"),
        F.lit(date).alias("ingest_date"),
    )


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def _convert(text: str, dtype: T.DataType) -> Any:
    """One CSV field as the schema's type; an empty field is null; ValueError if it does not parse."""
    if text == "":
        return None
    if isinstance(dtype, T.StringType):
        return text
    if isinstance(dtype, (T.DoubleType, T.FloatType)):
        if not _NUMBER.fullmatch(text.strip()):
            raise ValueError("not a finite number")
        return float(text)
    if isinstance(dtype, (T.LongType, T.IntegerType, T.ShortType)):
        if not _INTEGER.fullmatch(text.strip()):
            raise ValueError("not an integer")
        return int(text)
    if isinstance(dtype, T.TimestampType):
        value = dt.datetime.fromisoformat(text.strip())  # ISO 8601; no offset means UTC (the session time zone)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    if isinstance(dtype, T.DateType):
        return dt.date.fromisoformat(text.strip())
    if isinstance(dtype, T.BooleanType):
        if text.strip().lower() not in ("true", "false"):
            raise ValueError("not true/false")
        return text.strip().lower() == "true"
    raise ValueError(f"no CSV conversion for {dtype.simpleString()}")


def _read_csv(f: LandingFile, run_id: str) -> list[tuple[Any, ...]]:
    """The typed rows of a catalog or schedule CSV, in table column order, or CorruptInputError.

    These are small dimension snapshots (thousands of rows), so they are parsed here with
    the csv module (RFC 4180 quoting, strict): every problem is reported with its line,
    and line_number is the line a record starts on (the header is line 1).
    """
    spec = table_spec(TARGETS[f.kind])
    columns = [fld for fld in spec.schema.fields if fld.name not in CSV_META]
    rows: list[tuple[Any, ...]] = []
    problems: list[str] = []
    with open(f.path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, [])
            missing = [c.name for c in columns if c.name not in header]
            dupes = sorted({c for c in header if header.count(c) > 1})
            if not header or missing or dupes:
                detail = (([f"missing columns {missing}"] if missing else []) + ([f"duplicate columns {dupes}"] if dupes else []))
                raise CorruptInputError(f"corrupt CSV landing file {f.rel}: header {header}: {'; '.join(detail)}")
            where = [header.index(c.name) for c in columns]
            start = reader.line_num + 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record:
                    continue  # a blank line
                if len(record) != len(header):
                    problems.append(f"line {line}: {len(record)} fields, the header has {len(header)}")
                    continue
                values = []
                for col, i in zip(columns, where, strict=True):
                    try:
                        values.append(_convert(record[i], col.dataType))
                    except ValueError as exc:
                        problems.append(f"line {line}: {col.name}={record[i][:60]!r} does not parse ({exc})")
                rows.append((*values, f.rel, line, run_id, f.snapshot_date))
        except csv.Error as exc:
            problems.append(f"line {reader.line_num}: {exc}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CorruptInputError(f"corrupt CSV landing file {f.rel}: " + "; ".join(problems[:5]) + more + "; nothing was committed")
    return rows


# ----------------------------------------------------------------------------- exactly-once

def _commit_meta(run_id: str, date: dt.date, files: Sequence[LandingFile]) -> dict[str, Any]:
    """What a bronze commit records about itself so a later run can complete ingest_log."""
    return {
        "stage": META_STAGE, "run_id": run_id, "ingest_date": date.isoformat(),
        "files": [{"path": f.rel, "kind": f.kind, "size": f.size, "checksum": f.checksum} for f in files],
    }


def _not_committed_since(version: int, files: Sequence[LandingFile], date: dt.date) -> CommitGuard:
    """Refuse a bronze commit if another ingest committed any of its files after `version`.

    Why: two ingests of one date at once (a retry started while the first still writes, a
    second scheduler) both find the same files new; their appends do not conflict in
    Delta's eyes, and without this the second would double the files' rows in bronze and
    ingest_log. The loser exits 1 with nothing of that commit written; its re-run finds
    the files logged and skips them.
    """
    mine = {f.rel for f in files}

    def conflict(entry: Mapping[str, Any]) -> str | None:
        meta = _ingest_meta(dict(entry))
        taken = sorted(mine & {f["path"] for f in meta["files"]}) if meta else []
        if not taken:
            return None
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        return (f"landing files {', '.join(taken[:3])}{more} were committed by ingest run {meta['run_id']} "
                f"(version {entry['version']}) after this run found them new: two ingests of {date} ran at once")

    return CommitGuard(version, conflict)


def _log_row(date: dt.date | str, kind: str, path: str, size: int, checksum: str | None, rows: int, target: str,
             version: int, run_id: str, committed_at: dt.datetime) -> dict[str, Any]:
    return {
        "ingest_date": dt.date.fromisoformat(date) if isinstance(date, str) else date, "kind": kind, "path": path,
        "size": size, "checksum": checksum, "rows": rows, "target_table": target, "table_version": version,
        "ingest_run_id": run_id, "committed_at": committed_at,
    }


def _read_log(log_table: DeltaTable) -> dict[str, dict[str, Any]]:
    """ingest_log as path -> latest row (read with delta-rs + pyarrow, no Spark job)."""
    out: dict[str, dict[str, Any]] = {}
    for row in sorted(log_table.to_arrow().to_pylist(), key=lambda r: (r["table_version"] or -1)):
        out[row["path"]] = row
    return out


def _ingest_meta(entry: dict[str, Any]) -> dict[str, Any] | None:
    raw = entry.get("userMetadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("stage") == META_STAGE and meta.get("files") else None


def _reconcile(spark: SparkSession, tables: dict[str, DeltaTable], log_table: DeltaTable,
               logged: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Log every file a bronze ingest commit holds that ingest_log lacks (a crash between them).

    Updates `logged` in place and returns the rows written. They are merged on path, not
    appended: two runs repairing the same crash at once would otherwise log each file
    twice. The merge commits only if ingest_log is as it read it (else exit 1, re-run)
    and replaces the other run's rows if that run committed first.
    """
    rows: list[dict[str, Any]] = []
    for kind, table in tables.items():
        for entry in table.history(HISTORY_SCAN):
            meta = _ingest_meta(entry)
            if meta is None:
                continue
            missing = [f for f in meta["files"] if f["path"] not in logged]
            if not missing:
                continue
            version = int(entry["version"])
            counts, committed_at = _commit_rows(table, version, [f["path"] for f in missing], meta["run_id"])
            for f in missing:
                row = _log_row(meta["ingest_date"], f.get("kind", kind), f["path"], f["size"], f["checksum"],
                               counts.get(f["path"], 0), TARGETS[kind], version, meta["run_id"], committed_at)
                rows.append(row)
                logged[f["path"]] = row
    if rows:
        schema = arrow_schema(log_table.spec.schema)
        log_table.merge(spark.createDataFrame(pa.Table.from_pylist(rows, schema=schema)), keys=["path"],
                        commit_info={"stage": "ingest-reconcile", "files": len(rows)})
    return rows


def _commit_rows(table: DeltaTable, version: int, paths: Sequence[str], run_id: str) -> tuple[dict[str, int], dt.datetime]:
    """Rows per landing file in commit `version`, and the commit time.

    From the commit's add actions: each Parquet file holds rows of one landing file, so
    numRecords with min = max source_file attributes it exactly. If any file cannot be
    attributed (no stats, truncated stats), one groupBy over that version's rows of this
    run does it instead.
    """
    counts = dict.fromkeys(paths, 0)
    committed_at = dt.datetime.now(dt.UTC)
    attributed = False
    commit_file = table.path / "_delta_log" / f"{version:020d}.json"
    if commit_file.exists():
        attributed = True
        for line in commit_file.read_text(encoding="utf-8").splitlines():
            action = json.loads(line) if line.strip() else {}
            if "commitInfo" in action and action["commitInfo"].get("timestamp"):
                committed_at = dt.datetime.fromtimestamp(action["commitInfo"]["timestamp"] / 1000, dt.UTC)
            add = action.get("add")
            if not add:
                continue
            stats = json.loads(add.get("stats") or "{}")
            n = stats.get("numRecords")
            lo = (stats.get("minValues") or {}).get("source_file")
            hi = (stats.get("maxValues") or {}).get("source_file")
            if n == 0:
                continue
            if n is None or lo is None or lo != hi or lo not in counts:
                attributed = False
                break
            counts[lo] += int(n)
    if not attributed:
        counts = dict.fromkeys(paths, 0)
        frame = table.read(version=version).filter((F.col("ingest_run_id") == run_id) & F.col("source_file").isin(list(paths)))
        for r in frame.groupBy("source_file").count().collect():
            counts[r[0]] = int(r[1])
    return counts, committed_at


def _maybe_fail_after_bronze() -> None:
    """Test hook: STREAMRANK_FAULT_AFTER_BRONZE_COMMIT=raise|kill fails before the ingest_log append."""
    action = os.environ.get(FAULT_AFTER_BRONZE_ENV, "")
    if not action:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault after the bronze commits, before the {INGEST_LOG} append")
