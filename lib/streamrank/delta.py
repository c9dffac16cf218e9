"""The Delta table layer: one API, two engines (DESIGN section 3).

`Warehouse(spark, cfg).table("silver/viewer_events")` returns a `DeltaTable` whose
methods - create, read, append, overwrite, merge, history, vacuum, optimize - behave the
same whichever engine runs underneath:

- `spark`: delta-spark's own API (format("delta"), replaceWhere, DeltaTable.merge,
  OPTIMIZE, VACUUM). Needs the io.delta jars on the Spark classpath.
- `rs`: delta-rs owns the transaction log and Spark moves the data. Spark writes Parquet
  into a private staging directory under the table root; the files are moved into the
  table's partition directories and ONE delta-rs commit (add and remove actions with
  sizes, record counts and column statistics) makes them visible. A crash before the
  commit leaves only files no snapshot references; `vacuum` removes them. Data never
  passes through the driver: only file paths, footers and partition values do.

`stage_overwrite` splits a write in two (write, audit, publish): the files are written
now and the returned `StagedWrite` commits or discards them later, so a stage can validate
its output while the files are being written and still publish nothing if the audit fails.

Either way the tables are plain Delta that delta-spark, delta-rs, DuckDB or polars read.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import deltalake
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.transaction import AddAction, CommitProperties
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from streamrank.config import Config
from streamrank.errors import ConcurrentWriteError, SchemaMismatchError, StreamrankError
from streamrank.schemas import TableSpec, all_table_names, table_spec
from streamrank.spark import resolve_engine

log = logging.getLogger(__name__)

STAGING_PREFIX = "w-"
FAULT_ENV = "STREAMRANK_FAULT_BEFORE_COMMIT"  # "<table>:raise" or "<table>:kill", for crash tests
Where = Mapping[str, Any]  # column -> value or list of values (IN), ANDed


class NotPlainParquetError(StreamrankError):
    """`DeltaTable.files` of a snapshot whose files are not its rows (deletion vectors, column mapping)."""


class InjectedFault(StreamrankError):
    """Raised by the test hook between writing files and committing them."""


@dataclass(frozen=True)
class CommitResult:
    """What a write did: the version it produced and the rows and files it added/removed."""

    version: int
    rows_added: int
    files_added: int
    files_removed: int


@dataclass(frozen=True)
class CommitGuard:
    """A precondition a write checks, at its commit, against every commit made after `since`.

    Why: a writer that decided what to write from an earlier version must not commit on top
    of a commit that already wrote it. Ingest decides which landing files are new from the
    bronze version it read; if another ingest of the same date commits those files first,
    both appends are blind to each other (Delta, and delta-rs's checker, see no conflict
    between two appends), and the rows would be doubled. `conflict` gets each later
    commit's history entry (our commit metadata included) and returns why this write must
    not go on top of it, or None.
    """

    since: int
    conflict: Callable[[Mapping[str, Any]], str | None]


class StagedWrite:
    """A write whose files exist but which no reader sees until `commit`.

    Returned by `DeltaTable.stage_overwrite`. Exactly one of `commit` or `discard` takes
    effect; the other, and any repeat, does nothing (so an error path may discard every
    staged write without knowing which were already committed). On the rs engine the
    Parquet files are already in the table's directories, unreferenced; on the spark
    engine delta-spark has no uncommitted files to offer, so the whole write runs at commit.
    """

    def __init__(self, table: str, rows: int, commit: Callable[[], CommitResult], discard: Callable[[], None],
                 read: Callable[[], DataFrame] | None = None) -> None:
        self.table = table
        self.rows = rows  # rows in the staged files; -1 when the engine writes at commit
        self._commit, self._discard, self._read = commit, discard, read
        self.state = "staged"

    def __repr__(self) -> str:
        return f"StagedWrite({self.table!r}, rows={self.rows}, {self.state})"

    def commit(self) -> CommitResult:
        """Make the staged files the table's new version (one Delta commit)."""
        if self.state != "staged":
            raise StreamrankError(f"staged write to {self.table} is already {self.state}")
        self.state = "committing"
        try:
            result = self._commit()
        except BaseException:
            self.state = "discarded"  # the commit removed its files on the way out
            raise
        self.state = "committed"
        return result

    def read(self, fallback: DataFrame | None = None) -> DataFrame | None:
        """The staged rows as a Spark frame over exactly the staged Parquet files, in table
        column order; `fallback` (the frame that was written) on the spark engine, which
        has no files before its commit.

        Why: an audit of what is about to be published should read what was written, not
        recompute it. Reading the files also costs less than recomputing the frame's
        lineage, as each check reads only the columns it needs.
        """
        if self.state != "staged":
            raise StreamrankError(f"staged write to {self.table} is {self.state}: its files are no longer staged")
        return fallback if self._read is None else self._read()

    def discard(self) -> None:
        """Delete the staged files; the table is left exactly as it was."""
        if self.state == "staged":
            self.state = "discarded"
            self._discard()


# ---------------------------------------------------------------------------------------
# Schema helpers shared by both engines
# ---------------------------------------------------------------------------------------

def conform(df: DataFrame, spec: TableSpec, evolve: bool = False) -> DataFrame:
    """Select `df` in table column order, or fail naming every mismatched column.

    Nullability is not compared (Spark infers it loosely); names and types are. With
    `evolve=True`, extra columns are allowed (the caller adds them to the table first).
    """
    table_types = {f.name: f.dataType for f in spec.schema.fields}
    frame_types = {f.name: f.dataType for f in df.schema.fields}
    missing = [c for c in table_types if c not in frame_types]
    extra = [c for c in frame_types if c not in table_types]
    wrong = [
        f"{c} (table {table_types[c].simpleString()}, frame {frame_types[c].simpleString()})"
        for c in table_types
        if c in frame_types and not _same_type(table_types[c], frame_types[c])
    ]
    problems = []
    if missing:
        problems.append(f"missing columns {missing}")
    if extra and not evolve:
        problems.append(f"unexpected columns {extra} (pass evolve=True to add them)")
    if wrong:
        problems.append(f"type mismatches {wrong}")
    if problems:
        raise SchemaMismatchError(f"write to {spec.name}: " + "; ".join(problems))
    cols = list(table_types) + (extra if evolve else [])
    return df.select(*cols)


def _same_type(a: T.DataType, b: T.DataType) -> bool:
    """Type equality ignoring nullability flags inside arrays, maps and structs."""
    strip = lambda t: json.dumps(_strip_nullability(t.jsonValue()), sort_keys=True)  # noqa: E731
    return strip(a) == strip(b)


def _strip_nullability(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_nullability(v) for k, v in node.items() if k not in ("nullable", "containsNull", "valueContainsNull", "metadata")}
    if isinstance(node, list):
        return [_strip_nullability(v) for v in node]
    return node


def _where_column(where: Where) -> Column:
    cond = F.lit(True)
    for col, value in where.items():
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        cond = cond & F.col(col).isin(values)
    return cond


def _where_sql(where: Where) -> str:
    parts = []
    for col, value in where.items():
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        parts.append(f"`{col}` IN ({', '.join(_sql_literal(v) for v in values)})")
    return " AND ".join(parts) or "true"


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dt.datetime):
        return f"TIMESTAMP '{value.isoformat()}'"
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


def _to_text(value: Any) -> str | None:
    """How Delta stores partition values and how we compare them: plain text."""
    if value is None:
        return None
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


# ---------------------------------------------------------------------------------------
# The public table object
# ---------------------------------------------------------------------------------------

class DeltaTable:
    """A warehouse table: schema from schemas/tables, storage at `<root>/<layer>/<table>`."""

    def __init__(self, spark: SparkSession, spec: TableSpec, root: Path, engine: str) -> None:
        self.spark = spark
        self.spec = spec
        self.path = root / spec.name
        self.engine = engine
        self.uri = str(self.path)

    def __repr__(self) -> str:
        return f"DeltaTable({self.spec.name!r}, engine={self.engine!r}, path={self.uri!r})"

    # -- lifecycle -----------------------------------------------------------------
    def exists(self) -> bool:
        return deltalake.DeltaTable.is_deltatable(self.uri)

    def create(self) -> bool:
        """Create the empty table from its schema file if it does not exist; True if created."""
        if self.exists():
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        if self.engine == "spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            (
                SparkDeltaTable.createIfNotExists(self.spark)
                .location(self.uri)
                .addColumns(self.spec.schema)
                .partitionedBy(*self.spec.partition_by)
                .comment(self.spec.description)
                .execute()
            )
        else:
            try:
                deltalake.DeltaTable.create(
                    self.uri,
                    schema=deltalake.Schema.from_json(self.spec.schema.json()),
                    partition_by=list(self.spec.partition_by) or None,
                    mode="error",
                    name=self.spec.view_name,
                    description=self.spec.description,
                )
            except Exception as exc:  # a concurrent creator won the race: fine
                if not self.exists():
                    raise StreamrankError(f"cannot create table {self.spec.name} at {self.uri}: {exc}") from exc
                return False
        return True

    def _require(self) -> None:
        if not self.exists():
            self.create()

    def missing_columns(self) -> list[str]:
        """Columns of the schema file that the table's log does not have yet."""
        if not self.exists():
            return []
        logged = {f.name for f in deltalake.DeltaTable(self.uri).schema().fields}
        return [f.name for f in self.spec.schema.fields if f.name not in logged]

    def upgrade_schema(self) -> list[str]:
        """Add the columns the schema file gained since the table was created; return them.

        Why: the contract grows by adding columns (e.g. the stream context of the gold
        tables), and a warehouse created before must take them without a rebuild. The
        columns are nullable; files written before read them as null. Runs before every
        write, so a new release upgrades each table the first time it writes to it.
        """
        missing = self.missing_columns()
        if missing:
            self._alter_add_columns([f for f in self.spec.schema.fields if f.name in missing])
            log.warning("schema upgrade of %s: added columns %s from its schema file", self.spec.name, missing)
        return missing

    # -- reads -----------------------------------------------------------------------
    def version(self) -> int | None:
        """Latest committed version, or None if the table does not exist yet."""
        if not self.exists():
            return None
        return deltalake.DeltaTable(self.uri).version()

    def _snapshot(self, version: int | None = None, timestamp: dt.datetime | str | None = None) -> deltalake.DeltaTable:
        self._require()
        table = deltalake.DeltaTable(self.uri, version=version)
        if timestamp is not None:
            table.load_as_version(timestamp)
        return table

    def read(self, version: int | None = None, timestamp: dt.datetime | str | None = None) -> DataFrame:
        """The table as a Spark DataFrame: latest, or as of a version or a timestamp."""
        self._require()
        if self.engine == "spark":
            reader = self.spark.read.format("delta")
            if version is not None:
                reader = reader.option("versionAsOf", version)
            if timestamp is not None:
                reader = reader.option("timestampAsOf", str(timestamp))
            return reader.load(self.uri)
        snapshot = self._snapshot(version, timestamp)
        self._refuse_column_mapping(snapshot, "read")
        schema = T.StructType.fromJson(json.loads(snapshot.schema().to_json()))  # the log's, incl. evolved columns
        files = self._files(snapshot)
        if not files:
            return self.spark.createDataFrame([], schema)
        reader = self.spark.read.schema(schema)
        if self.spec.partition_by:
            reader = reader.option("basePath", self.uri)
        df = reader.parquet(*[path for path, _ in files])
        deleted = _deleted_rows(snapshot)
        if deleted:
            df = self._without_deleted(df, deleted)
        return df.select(*schema.fieldNames())

    def _without_deleted(self, df: DataFrame, deleted: Mapping[str, np.ndarray]) -> DataFrame:
        """`df` (a Parquet scan of the snapshot's files) less the rows its deletion vectors delete.

        Why: a file with a deletion vector still holds the deleted rows; delta-spark drops
        them by their position in the file, and so does this, with Spark's own row index of
        a Parquet file (`_metadata.row_index`) anti-joined with the deleted positions.
        """
        positions = pa.table({
            "_dv_file": pa.array([path for path, rows in deleted.items() for _ in range(rows.size)], pa.string()),
            "_dv_row": pa.array(np.concatenate(list(deleted.values())), pa.int64()),
        }).to_pandas()
        gone = self.spark.createDataFrame(positions, "_dv_file string, _dv_row bigint")
        located = df.withColumns({
            # Spark names a local file file:/..., percent-encoded like delta-rs's URIs
            "_dv_file": F.expr("url_decode(regexp_replace(_metadata.file_path, '^file:(//)?', ''))"),
            "_dv_row": F.col("_metadata.row_index"),
        })
        return located.join(gone, ["_dv_file", "_dv_row"], "left_anti").drop("_dv_file", "_dv_row")

    def to_arrow(self, version: int | None = None, partitions: Where | None = None) -> pa.Table:
        """The table (or some partitions of it) without Spark: delta-rs picks the snapshot's
        files, pyarrow reads them.

        `partitions` reads only the files of those partition values: an ops table gains
        files every night, and a stage that needs last week's rows should not read its
        whole history. (delta-rs's own to_pyarrow_table needs pyarrow >= 15 for string
        views; the stack pins pyarrow 14 for Petastorm, so the files are read here with
        their partition values added back as typed columns.)
        """
        schema = arrow_schema(self.spec.schema)
        snapshot = self._snapshot(version)
        self._refuse_column_mapping(snapshot, "read", direct=True)
        deleted = _deleted_rows(snapshot)
        pieces = []
        for path, parts in self._partition_files(snapshot, partitions):
            piece = pq.read_table(path)
            if path in deleted:
                keep = np.ones(piece.num_rows, dtype=bool)
                keep[deleted[path]] = False
                piece = piece.filter(pa.array(keep))
            for field in schema:  # a column added after this file was written reads as null
                if field.name not in piece.column_names and field.name not in self.spec.partition_by:
                    piece = piece.append_column(field.name, pa.nulls(piece.num_rows, field.type))
            for col in self.spec.partition_by:
                value = parts[col]
                arr = pa.array([value] * piece.num_rows, pa.string())
                piece = piece.append_column(col, arr.cast(schema.field(col).type))
            pieces.append(piece.select(schema.names).cast(schema))
        return pa.concat_tables(pieces) if pieces else schema.empty_table()

    def files(self, version: int | None = None, partitions: Where | None = None) -> list[str]:
        """Absolute file URIs of a snapshot (optionally of some partitions only): exactly what
        a reader such as Petastorm must read, nothing a concurrent writer has not committed.

        Raises NotPlainParquetError where the files are not the rows (see plain_parquet): a
        file reader would bring back deleted rows, so it must not get a list at all.
        """
        snapshot = self._snapshot(version)
        selected = self._partition_files(snapshot, partitions)
        if not _plain(snapshot, selected):
            raise NotPlainParquetError(
                f"{self.spec.name} (version {version if version is not None else 'latest'}) has rows deleted by "
                "deletion vectors or uses column mapping: its Parquet files are not its rows, so they cannot be read "
                "directly; read it through the engine (DeltaTable.read), or rewrite its files without deletion "
                "vectors first (delta-spark: REORG TABLE ... APPLY (PURGE))")
        if self.engine == "spark":
            df = self.read(version)
            if partitions:
                df = df.filter(_where_column(partitions))
            return sorted(df.inputFiles())
        return sorted(f"file://{path}" for path, _ in selected)

    def plain_parquet(self, version: int | None = None, partitions: Where | None = None) -> bool:
        """Whether the rows of the snapshot (or of some partitions of it) are exactly its
        files' rows, under their own names.

        A reader of `files()` (Petastorm, pyarrow) sees the Parquet files, not the log: a
        file with a deletion vector still holds rows the table deleted, and with column
        mapping its columns have physical names. Our writers produce neither, but delta-spark
        does on a table enabled for them (`delta.enableDeletionVectors`, then DELETE, UPDATE
        or MERGE). A table merely enabled for deletion vectors whose files carry none is
        still plain.
        """
        snapshot = self._snapshot(version)
        return _plain(snapshot, self._partition_files(snapshot, partitions))

    def _refuse_column_mapping(self, snapshot: deltalake.DeltaTable, action: str, direct: bool = False) -> None:
        """The rs engine, and any `direct` read of the files with pyarrow, take Parquet columns
        by their logical names, so a column-mapped table (physical names in the files) is
        delta-spark's to handle."""
        mode = _column_mapping(snapshot)
        if mode != "none" and (direct or self.engine == "rs"):
            how = "with pyarrow" if direct else "with the rs engine"
            raise StreamrankError(
                f"cannot {action} {self.spec.name} {how}: the table uses column mapping (mode {mode}), whose "
                "Parquet columns have physical names; use delta.engine=spark (needs the io.delta jars)")

    def _refuse_deletion_vectors(self, snapshot: deltalake.DeltaTable, action: str, paths: Iterable[str]) -> None:
        """The rs engine replaces whole files; a file with a deletion vector would be
        removed without it (readers match a remove to its add by path AND vector) or
        rewritten with its deleted rows, so such writes are delta-spark's. Files the write
        does not replace may keep their vectors."""
        carrying = sorted(set(paths) & set(_deleted_rows(snapshot)))
        if carrying:
            raise StreamrankError(
                f"cannot {action} {self.spec.name} with the rs engine: {len(carrying)} of the files it replaces carry "
                f"deletion vectors (e.g. {carrying[0]}); rewrite them first (delta-spark: REORG TABLE ... "
                "APPLY (PURGE)) or set delta.engine=spark")

    def _partition_files(self, snapshot: deltalake.DeltaTable, partitions: Where | None
                         ) -> list[tuple[str, dict[str, str | None]]]:
        """`_files` of the partitions whose values are in `partitions` (all without it)."""
        wanted = {c: {_to_text(v) for v in (vals if isinstance(vals, (list, tuple, set)) else [vals])}
                  for c, vals in (partitions or {}).items()}
        unknown = sorted(set(wanted) - set(self.spec.partition_by))
        if unknown:
            raise StreamrankError(f"files of {self.spec.name}: {unknown} are not partition columns {list(self.spec.partition_by)}")
        return [(path, parts) for path, parts in self._files(snapshot) if all(parts[c] in vals for c, vals in wanted.items())]

    def _files(self, snapshot: deltalake.DeltaTable) -> list[tuple[str, dict[str, str | None]]]:
        actions = _add_actions(snapshot)
        out = []
        for i, rel in enumerate(actions.get("path", [])):
            parts = {c: actions.get(f"partition.{c}", [None] * (i + 1))[i] for c in self.spec.partition_by}
            out.append((str(self.path / unquote(rel)), {k: _to_text(v) for k, v in parts.items()}))
        return out

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Commits, newest first: version, timestamp, operation and our commit metadata."""
        if not self.exists():
            return []
        return deltalake.DeltaTable(self.uri).history(limit)

    # -- writes --------------------------------------------------------------------
    def append(self, df: DataFrame, *, evolve: bool = False, commit_info: Mapping[str, Any] | None = None,
               txn: tuple[str, int] | None = None, guard: CommitGuard | None = None) -> CommitResult:
        """Add the rows of `df` in one commit.

        With a `guard`, the commit is refused (ConcurrentWriteError, nothing committed) if
        a commit made after `guard.since` conflicts with it; see `CommitGuard`.
        """
        return self._write(df, mode="append", where=None, evolve=evolve, commit_info=commit_info, txn=txn, guard=guard)

    def overwrite(self, df: DataFrame, where: Where | None = None, *, evolve: bool = False,
                  commit_info: Mapping[str, Any] | None = None, txn: tuple[str, int] | None = None,
                  guard: CommitGuard | None = None) -> CommitResult:
        """Replace the rows matching `where` (all rows if None) with `df`, atomically.

        `where` maps columns to a value or a list of values, e.g. {"event_date": [d1, d2]}
        or {"ingest_date": d}; it is Delta's replaceWhere. Every row of `df` must match it,
        so a re-run for the same partition leaves exactly one copy. `guard` as in `append`.
        """
        return self._write(df, mode="overwrite", where=where, evolve=evolve, commit_info=commit_info, txn=txn,
                           guard=guard)

    def stage_overwrite(self, df: DataFrame, where: Where | None = None, *, commit_info: Mapping[str, Any] | None = None,
                        txn: tuple[str, int] | None = None) -> StagedWrite:
        """`overwrite`, with the files written now and the commit left to the caller.

        Why: a stage that must validate its output before publishing it can write the
        files while it validates (the Spark write and the audit overlap) and then commit,
        or discard and leave the table untouched. As in `overwrite`, the commit removes
        the files `where` matched in the snapshot read here, so the window in which a
        concurrent writer could interleave lasts until `commit`: commit soon after.
        """
        return self._stage(df, mode="overwrite", where=where, evolve=False, commit_info=commit_info, txn=txn)

    def merge(self, df: DataFrame, keys: Sequence[str], *, commit_info: Mapping[str, Any] | None = None) -> CommitResult:
        """Upsert `df` on `keys`: matching rows are replaced, new rows inserted.

        A key that appears twice in `df` is an error (which row would win is undefined).
        """
        self._require()
        df = conform(df, self.spec)
        dupes = df.groupBy(*keys).count().filter("count > 1").limit(5).collect()
        if dupes:
            raise StreamrankError(f"merge into {self.spec.name}: source has duplicate keys {keys}, e.g. {[r.asDict() for r in dupes]}")
        if self.engine == "spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
            (
                SparkDeltaTable.forPath(self.spark, self.uri).alias("t").merge(df.alias("s"), cond)
                .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute()
            )
            return CommitResult(self.version() or 0, -1, -1, -1)
        snapshot = self._snapshot()
        self._refuse_column_mapping(snapshot, "merge into")
        files = self._files(snapshot)
        touched = files
        pkeys = [k for k in self.spec.partition_by if k in keys]
        if pkeys:
            wanted = {tuple(_to_text(r[k]) for k in pkeys) for r in df.select(*pkeys).distinct().collect()}
            touched = [f for f in files if tuple(f[1][k] for k in pkeys) in wanted]
        self._refuse_deletion_vectors(snapshot, "merge into", (p for p, _ in touched))
        if touched:
            target = self.spark.read.schema(self.spec.schema)
            if self.spec.partition_by:
                target = target.option("basePath", self.uri)
            current = target.parquet(*[p for p, _ in touched]).select(*self.spec.schema.fieldNames())
            merged = current.join(df.select(*keys), on=[current[k].eqNullSafe(df[k]) for k in keys], how="left_anti").unionByName(df)
        else:
            merged = df
        def scope(parts: Mapping[str, str | None], stats: Any) -> bool:
            return not pkeys or tuple(parts[k] for k in pkeys) in wanted

        return self._rs_stage(snapshot, merged, removes=touched, commit_info=commit_info, operation="MERGE",
                              scope=scope).commit()

    def append_rows(self, rows: Iterable[Mapping[str, Any]], *, commit_info: Mapping[str, Any] | None = None) -> int:
        """Append a handful of Python rows (ops tables) without a Spark job on the rs engine."""
        self._require()
        rows = [dict(r) for r in rows]
        if not rows:
            return self.version() or 0
        unknown = sorted({k for r in rows for k in r} - set(self.spec.schema.fieldNames()))
        if unknown:
            raise SchemaMismatchError(f"append_rows to {self.spec.name}: unexpected columns {unknown}")
        if self.engine == "spark":
            return self.append(self.spark.createDataFrame(rows, self.spec.schema), commit_info=commit_info).version
        schema = arrow_schema(self.spec.schema)
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
        deltalake.write_deltalake(
            self.uri, table, mode="append", partition_by=list(self.spec.partition_by) or None,
            commit_properties=CommitProperties(custom_metadata=_commit_metadata(commit_info), max_commit_retries=50),
        )
        return deltalake.DeltaTable(self.uri).version()

    # -- maintenance -----------------------------------------------------------------
    def vacuum(self, retention_hours: float = 168.0, dry_run: bool = False) -> list[str]:
        """Delete files no snapshot within the retention needs, and abandoned staging dirs.

        retention_hours=0 also removes the orphans of a crashed write at once; never run
        it with 0 while another writer may be between its file write and its commit.
        """
        if not self.exists():
            return []
        removed = deltalake.DeltaTable(self.uri).vacuum(
            retention_hours=int(retention_hours), dry_run=dry_run, enforce_retention_duration=False, full=True
        )
        removed = [str(self.path / unquote(p)) for p in removed]
        cutoff = time.time() - retention_hours * 3600
        for staging in self.path.glob(STAGING_PREFIX + "*"):
            if staging.is_dir() and staging.stat().st_mtime <= cutoff:
                inside = str(staging) + os.sep
                if not any(p.startswith(inside) for p in removed):  # not listed already file by file
                    removed.append(str(staging))
                if not dry_run:
                    shutil.rmtree(staging, ignore_errors=True)
        return removed

    def restore(self, version: int, *, commit_info: Mapping[str, Any] | None = None) -> int:
        """Make the table's content that of `version` again, as one new commit; returns its version.

        History is kept (the undone commits stay readable by time travel), so a restore is
        itself auditable and can be undone. Needs the files of `version`, which `vacuum`
        keeps for its retention period.
        """
        self._require()
        if self.engine == "spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            SparkDeltaTable.forPath(self.spark, self.uri).restoreToVersion(version)
            return int(self.version() or 0)
        table = deltalake.DeltaTable(self.uri)
        table.restore(version, commit_properties=CommitProperties(
            custom_metadata=_commit_metadata(commit_info, "RESTORE"), max_commit_retries=50))
        return deltalake.DeltaTable(self.uri).version()

    def compaction_plan(self, target_size: int | None = None) -> dict[tuple[str | None, ...], int]:
        """Partition values -> files `optimize` on the rs engine would rewrite there: files below
        the target size (`delta.targetFileSize`, else delta-rs's 100 MiB), in partitions that
        hold two or more of them (a lone small file has nothing to be packed with).

        delta-rs's compaction has no dry run of its own; `maintain --dry-run` reports this.
        """
        self._require()
        snapshot = self._snapshot()
        target = target_size or int((snapshot.metadata().configuration or {}).get("delta.targetFileSize", RS_TARGET_FILE_SIZE))
        actions = _add_actions(snapshot)
        small: dict[tuple[str | None, ...], int] = {}
        for i, size in enumerate(actions.get("size_bytes", [])):
            if size < target:
                key = tuple(_to_text(actions[f"partition.{c}"][i]) for c in self.spec.partition_by)
                small[key] = small.get(key, 0) + 1
        return {key: n for key, n in small.items() if n > 1}

    def optimize(self, target_size: int | None = None, *, commit_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Compact small files (bin-packing) in one commit; data and version history are kept.

        Returns the engine's metrics; both report `numFilesAdded` and `numFilesRemoved`.
        """
        self._require()
        if self.engine == "spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            metrics = SparkDeltaTable.forPath(self.spark, self.uri).optimize().executeCompaction().first()["metrics"]
            return {"numFilesAdded": metrics["numFilesAdded"], "numFilesRemoved": metrics["numFilesRemoved"],
                    "version": self.version()}
        return deltalake.DeltaTable(self.uri).optimize.compact(target_size=target_size, commit_properties=CommitProperties(
            custom_metadata=_commit_metadata(commit_info, "OPTIMIZE"), max_commit_retries=50))

    # -- internals ----------------------------------------------------------------------
    def _write(self, df: DataFrame, mode: str, where: Where | None, evolve: bool,
               commit_info: Mapping[str, Any] | None, txn: tuple[str, int] | None,
               guard: CommitGuard | None = None) -> CommitResult:
        return self._stage(df, mode, where, evolve, commit_info, txn, guard).commit()

    def _stage(self, df: DataFrame, mode: str, where: Where | None, evolve: bool,
               commit_info: Mapping[str, Any] | None, txn: tuple[str, int] | None,
               guard: CommitGuard | None = None) -> StagedWrite:
        self._require()
        self.upgrade_schema()
        extra = [c for c in df.columns if c not in self.spec.schema.fieldNames()]
        df = conform(df, self.spec, evolve=evolve)
        if evolve and extra:
            self._add_columns(df.schema, extra)
            df = df.select(*self.spec.schema.fieldNames())
        if self.engine == "spark":
            return StagedWrite(self.spec.name, -1,
                               lambda: self._spark_write(df, mode, where, evolve, commit_info, txn, guard), lambda: None)
        snapshot = self._snapshot()
        self._refuse_column_mapping(snapshot, "write")
        removes: list[tuple[str, dict[str, str | None]]] = []
        frame = df
        if mode == "overwrite":
            removes, rewrite = self._plan_replace(snapshot, where)
            self._refuse_deletion_vectors(snapshot, "overwrite", (p for p, _ in removes + rewrite))
            if rewrite:
                kept = (
                    self.spark.read.schema(self.spec.schema).option("basePath", self.uri)
                    .parquet(*[p for p, _ in rewrite]).select(*self.spec.schema.fieldNames())
                    .filter(~_where_column(where or {}))
                )
                frame = df.unionByName(kept, allowMissingColumns=evolve)
                removes = removes + rewrite
        scope = None if mode == "append" else (lambda parts, stats: not where or self._matches(where, parts, stats) != "none")
        return self._rs_stage(snapshot, frame, removes=removes, commit_info=commit_info, txn=txn,
                              operation="WRITE" if mode == "append" else "REPLACE",
                              check=(df, where) if where else None, scope=scope, guard=guard)

    def _add_columns(self, schema: T.StructType, extra: list[str]) -> None:
        """Columns a write brings beyond the schema file (``evolve=True``): the spark engine adds
        them through mergeSchema, the rs engine here."""
        new_fields = [f for f in schema.fields if f.name in extra]
        if self.engine == "rs":
            self._alter_add_columns(new_fields)
        log.warning("schema evolution on %s: added columns %s", self.spec.name, extra)
        self.spec = TableSpec(self.spec.name, T.StructType(self.spec.schema.fields + new_fields),
                              self.spec.partition_by, self.spec.description)

    def _alter_add_columns(self, fields: list[T.StructField]) -> None:
        """Add nullable columns to the table's log, with each engine's own operation."""
        if self.engine == "spark":
            cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in fields)
            self.spark.sql(f"ALTER TABLE delta.`{self.uri}` ADD COLUMNS ({cols})")
        else:
            deltalake.DeltaTable(self.uri).alter.add_columns(
                [deltalake.Field.from_json(json.dumps(f.jsonValue())) for f in fields])

    def _plan_replace(self, snapshot: deltalake.DeltaTable, where: Where | None
                      ) -> tuple[list[tuple[str, dict[str, str | None]]], list[tuple[str, dict[str, str | None]]]]:
        """Split current files into those removed whole and those that must be rewritten.

        Partition values decide exactly; for data columns the file statistics do when a
        file holds a single value (min == max); any other file is read, filtered, rewritten.
        """
        files = self._files(snapshot)
        if not where:
            return files, []
        stats = self._file_stats(snapshot)
        remove, rewrite = [], []
        for path, parts in files:
            verdict = self._matches(where, parts, stats.get(path, {}))
            if verdict != "none":
                (remove if verdict == "all" else rewrite).append((path, parts))
        return remove, rewrite

    def _matches(self, where: Where, parts: Mapping[str, str | None],
                 stats: Mapping[str, tuple[str | None, str | None]]) -> str:
        """Whether a file's rows match `where`: "all", "none" or "some" (it must be read)."""
        verdicts = []
        for col, value in where.items():
            wanted = {_to_text(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])}
            if col in self.spec.partition_by:
                verdicts.append("all" if parts[col] in wanted else "none")
                continue
            lo, hi = stats.get(col, (None, None))
            if lo is not None and lo == hi:
                verdicts.append("all" if lo in wanted else "none")
            else:
                verdicts.append("some")
        return "none" if "none" in verdicts else "all" if all(v == "all" for v in verdicts) else "some"

    def _file_stats(self, snapshot: deltalake.DeltaTable) -> dict[str, dict[str, tuple[str | None, str | None]]]:
        actions = _add_actions(snapshot)
        out: dict[str, dict[str, tuple[str | None, str | None]]] = {}
        for i, rel in enumerate(actions.get("path", [])):
            cols = {}
            for c in self.spec.data_columns:
                lo = actions.get(f"min.{c}", [None] * (i + 1))[i]
                hi = actions.get(f"max.{c}", [None] * (i + 1))[i]
                cols[c] = (_to_text(lo), _to_text(hi))
            out[str(self.path / unquote(rel))] = cols
        return out

    def _rs_stage(self, snapshot: deltalake.DeltaTable, frame: DataFrame,
                  removes: list[tuple[str, dict[str, str | None]]], commit_info: Mapping[str, Any] | None,
                  operation: str, txn: tuple[str, int] | None = None,
                  check: tuple[DataFrame, Where] | None = None,
                  scope: Callable[[Mapping[str, str | None], Any], bool] | None = None,
                  guard: CommitGuard | None = None) -> StagedWrite:
        """Write `frame`'s files (uncommitted) and return the commit of them against `snapshot`.

        `scope` tells which files a replace or merge read (by partition values and column
        stats); None for a blind append. With a scope or a `guard` the commit is checked
        here against every commit made since (`_commit_checked`), not by delta-rs.
        """
        adds, rows = self._stage_files(frame)

        def unlink() -> None:  # never leave visible-looking debris behind a failed commit
            for add in adds:
                Path(self.path, add.path).unlink(missing_ok=True)

        try:
            if check:
                self._check_rows_match(check[0], adds, check[1])
        except BaseException:
            unlink()
            raise

        checked = scope is not None or guard is not None

        def commit() -> CommitResult:
            try:
                _maybe_inject_fault(self.spec.name)
                now = int(time.time() * 1000)
                remove_actions = [
                    deltalake.transaction.RemoveAction(
                        path=os.path.relpath(p, self.path), data_change=True, deletion_timestamp=now,
                        partition_values=parts or None, size=os.path.getsize(p) if os.path.exists(p) else None,
                    )
                    for p, parts in removes
                ]
                commit_id = uuid.uuid4().hex
                props = CommitProperties(
                    custom_metadata={**_commit_metadata(commit_info, operation), "streamrank.commit_id": commit_id},
                    max_commit_retries=0 if checked else 50,
                    app_transactions=[deltalake.transaction.Transaction(txn[0], txn[1], now)] if txn else None,
                )
                if not adds and not remove_actions and not txn:
                    return CommitResult(snapshot.version(), 0, 0, 0)
                if not checked:
                    snapshot.create_write_transaction(
                        actions=adds + remove_actions, mode="append", schema=snapshot.schema(),
                        partition_by=list(self.spec.partition_by) or None, commit_properties=props,
                    )
                else:
                    self._commit_checked(snapshot, adds + remove_actions, props, {p for p, _ in removes}, scope, guard)
            except BaseException:
                unlink()
                raise
            version = _committed_version(self.uri, commit_id, snapshot.version() + 1)
            return CommitResult(version, rows, len(adds), len(remove_actions))

        def read() -> DataFrame:
            if not adds:  # nothing written: an empty frame of the table's schema, not a read error
                return self.spark.createDataFrame([], self.spec.schema)
            return (self.spark.read.schema(self.spec.schema).option("basePath", self.uri)
                    .parquet(*[str(Path(self.path, a.path)) for a in adds]).select(*self.spec.schema.fieldNames()))

        return StagedWrite(self.spec.name, rows, commit, unlink, read)

    def _commit_checked(self, snapshot: deltalake.DeltaTable, actions: list[Any], props: CommitProperties,
                        removes: set[str], scope: Callable[[Mapping[str, str | None], Any], bool] | None,
                        guard: CommitGuard | None = None) -> None:
        """Commit a replace or merge only if no commit since `snapshot` touched what it read,
        and any write only if its `guard` finds no conflicting commit after `guard.since`.

        Why not delta-rs's own retries: its conflict checker lets a commit remove files that
        a concurrent commit with data_change=false already removed (measured with deltalake
        1.6.6). So a compaction (OPTIMIZE, `streamrank maintain`) that lands between our
        snapshot and our commit passes it, and the compacted file keeps the rows our commit
        replaces: the partition's rows are doubled. Each attempt here compares the latest
        snapshot with ours instead: a file we remove that is gone, or a new file in the scope
        we read, is a conflict (ConcurrentWriteError, nothing committed: re-run). Anything
        else (appends elsewhere, ops rows) is not, and the commit goes onto the latest
        version with delta-rs's retries off, so no later commit slips past unchecked.
        """
        for _ in range(50):
            latest = deltalake.DeltaTable(self.uri)
            if scope is not None and latest.version() != snapshot.version():
                self._check_no_conflict(snapshot, latest, removes, scope)
            if guard is not None:
                self._check_guard(latest, guard)
            try:
                latest.create_write_transaction(actions=actions, mode="append", schema=latest.schema(),
                                                partition_by=list(self.spec.partition_by) or None, commit_properties=props)
                return
            except Exception:
                if deltalake.DeltaTable(self.uri).version() == latest.version():
                    raise  # not a lost race: a real failure
        raise ConcurrentWriteError(f"{self.spec.name}: 50 commits by other writers in a row beat this one; nothing committed, re-run")

    def _check_no_conflict(self, snapshot: deltalake.DeltaTable, latest: deltalake.DeltaTable, removes: set[str],
                           scope: Callable[[Mapping[str, str | None], Any], bool]) -> None:
        before = {p for p, _ in self._files(snapshot)}
        now = self._files(latest)
        gone = removes - {p for p, _ in now}
        stats = self._file_stats(latest)
        new = [p for p, parts in now if p not in before and scope(parts, stats.get(p, {}))]
        if gone or new:
            ops = sorted({str(h.get("operation")) for h in latest.history(latest.version() - snapshot.version())})
            raise ConcurrentWriteError(
                f"{self.spec.name} changed while this write was staged (version {snapshot.version()} -> {latest.version()}, "
                f"{', '.join(ops)}): {len(gone)} of the files it replaces were removed and {len(new)} files were added "
                "where it reads. Nothing was committed; re-run the stage (a compaction by `streamrank maintain` "
                "running beside it is the usual cause)")

    def _check_guard(self, latest: deltalake.DeltaTable, guard: CommitGuard) -> None:
        """ConcurrentWriteError if a commit after `guard.since`, up to `latest`, conflicts."""
        newer = latest.version() - guard.since
        for entry in latest.history(newer) if newer > 0 else []:
            if int(entry["version"]) > guard.since and (why := guard.conflict(entry)):
                raise ConcurrentWriteError(f"{self.spec.name}: {why}. Nothing was committed; re-run the stage")

    def _check_rows_match(self, new_rows: DataFrame, adds: list[AddAction], where: Where) -> None:
        """Delta's replaceWhere contract: every new row matches the predicate.

        Partition-only predicates are checked for free on the written files' partition
        values; a predicate on data columns costs one Spark job over the new rows.
        """
        dcols = {c: v for c, v in where.items() if c not in self.spec.partition_by}
        if dcols:
            if new_rows.filter(~_where_column(where)).limit(1).count():
                raise StreamrankError(f"overwrite of {self.spec.name} where {_where_sql(where)}: written rows do not all match")
            return
        pcols = list(where)
        for add in adds:
            for c in pcols:
                wanted = {_to_text(v) for v in (where[c] if isinstance(where[c], (list, tuple, set)) else [where[c]])}
                if add.partition_values.get(c) not in wanted:
                    raise StreamrankError(
                        f"overwrite of {self.spec.name} where {_where_sql(where)}: written data has {c}={add.partition_values.get(c)}"
                    )

    def _stage_files(self, frame: DataFrame) -> tuple[list[AddAction], int]:
        """Spark writes Parquet to a private dir; files move into partition dirs, uncommitted."""
        staging = self.path / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        writer = frame.write.mode("error")
        if self.spec.partition_by:
            writer = writer.partitionBy(*self.spec.partition_by)
        writer.parquet(str(staging))
        written = [p for p in staging.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in p.relative_to(staging).parts)]
        moves = []
        for src in written:
            rel = src.relative_to(staging)
            dst = self.path / rel.parent / f"part-{uuid.uuid4().hex[:12]}-{rel.name.split('-', 2)[-1]}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            moves.append((src, dst, rel))
        for src, dst, _ in moves:
            os.replace(src, dst)
        shutil.rmtree(staging, ignore_errors=True)
        with ThreadPoolExecutor(max_workers=8) as pool:
            adds = list(pool.map(lambda m: self._add_action(m[1]), moves))
        return adds, sum(json.loads(a.stats)["numRecords"] for a in adds)

    def _add_action(self, path: Path) -> AddAction:
        rel = path.relative_to(self.path)
        parts = {}
        for segment in rel.parts[:-1]:
            if "=" in segment:
                key, value = segment.split("=", 1)
                value = unquote(value)
                parts[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
        st = path.stat()
        return AddAction(
            path=rel.as_posix(), size=st.st_size, partition_values=parts,
            modification_time=int(st.st_mtime * 1000), data_change=True, stats=json.dumps(parquet_stats(path)),
        )

    def _spark_write(self, df: DataFrame, mode: str, where: Where | None, evolve: bool,
                     commit_info: Mapping[str, Any] | None, txn: tuple[str, int] | None,
                     guard: CommitGuard | None = None) -> CommitResult:
        writer = df.write.format("delta").mode(mode)
        if self.spec.partition_by:
            writer = writer.partitionBy(*self.spec.partition_by)
        if where:
            writer = writer.option("replaceWhere", _where_sql(where))
        if evolve:
            writer = writer.option("mergeSchema", "true")
        if commit_info:
            writer = writer.option("userMetadata", json.dumps(commit_info, default=str))
        if txn:
            writer = writer.option("txnAppId", txn[0]).option("txnVersion", txn[1])
        _maybe_inject_fault(self.spec.name)
        if guard is not None:
            # delta-spark commits inside save(): the guard can only look just before it, so a
            # rival commit in the seconds of the write itself is not caught on this engine
            self._check_guard(deltalake.DeltaTable(self.uri), guard)
        writer.save(self.uri)
        return CommitResult(self.version() or 0, -1, -1, -1)


#: delta-rs's compaction target where the table sets no delta.targetFileSize (100 MiB)
RS_TARGET_FILE_SIZE = 104_857_600


def _add_actions(snapshot: deltalake.DeltaTable) -> dict[str, list[Any]]:
    """The snapshot's add actions as Python columns (delta-rs returns an arro3 table)."""
    return pa.table(snapshot.get_add_actions(flatten=True)).to_pydict()


def _plain(snapshot: deltalake.DeltaTable, selected: Sequence[tuple[str, Any]]) -> bool:
    """`plain_parquet` of the `selected` files of a loaded snapshot."""
    if _column_mapping(snapshot) != "none":
        return False
    deleted = _deleted_rows(snapshot)
    return not deleted or not any(path in deleted for path, _ in selected)


def _column_mapping(snapshot: deltalake.DeltaTable) -> str:
    """The snapshot's column mapping mode: none, name or id."""
    return (snapshot.metadata().configuration or {}).get("delta.columnMapping.mode") or "none"


def _deleted_rows(snapshot: deltalake.DeltaTable) -> dict[str, np.ndarray]:
    """Row positions deleted by deletion vectors, per data file (local path); only files with some.

    delta-rs resolves each vector (inline or in its own file) to a keep mask; positions
    past a mask's end are kept. A table whose protocol lacks the feature has none, and
    is not asked.
    """
    if "deletionVectors" not in (snapshot.protocol().reader_features or []):
        return {}
    masks = pa.table(snapshot.deletion_vectors().read_all())
    out = {}
    if masks.num_rows:
        column = masks.column("selection_vector").combine_chunks()
        offsets = np.asarray(column.offsets)
        keep = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=bool)
        for i, uri in enumerate(masks.column("filepath").to_pylist()):
            gone = np.flatnonzero(~keep[offsets[i]:offsets[i + 1]])
            if gone.size:
                out[_local_path(uri)] = gone
    return out


def _local_path(uri: str) -> str:
    """A file URI from delta-rs (file:///a/b%20c) as a local path (/a/b c)."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme in ("", "file") else uri


def _committed_version(uri: str, commit_id: str, not_before: int) -> int:
    """The version our commit landed at, found by its id (other writers may have committed too)."""
    table = deltalake.DeltaTable(uri)
    for entry in table.history(50):
        if entry.get("streamrank.commit_id") == commit_id:
            return int(entry["version"])
    return max(table.version(), not_before)


def _commit_metadata(commit_info: Mapping[str, Any] | None, operation: str | None = None) -> dict[str, Any]:
    meta = {"engine": "streamrank-rs"}
    if operation:
        meta["streamrank.operation"] = operation
    if commit_info:
        meta["userMetadata"] = json.dumps(dict(commit_info), default=str, sort_keys=True)
    return meta


def _maybe_inject_fault(table: str) -> None:
    """Test hook: STREAMRANK_FAULT_BEFORE_COMMIT=<table>:raise|kill fails between write and commit."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    name, _, action = spec.rpartition(":")
    if name != table:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault before committing {table}")


def parquet_stats(path: Path) -> dict[str, Any]:
    """Delta file statistics (numRecords, minValues, maxValues, nullCount) from the footer."""
    meta = pq.read_metadata(path)
    schema = meta.schema.to_arrow_schema()
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for ci in range(meta.num_columns):
        col = meta.schema.column(ci)
        name = col.path
        if "." in name:  # nested (arrays): Delta only needs nullCount of leaves; skip
            continue
        ftype = schema.field(name).type
        lo = hi = None
        null_count = 0
        ok = True
        for rg in range(meta.num_row_groups):
            st = meta.row_group(rg).column(ci).statistics
            if st is None or not st.has_null_count:
                ok = False
                break
            null_count += st.null_count
            if st.has_min_max:
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
        if not ok:
            continue
        nulls[name] = null_count
        if lo is None or pa.types.is_boolean(ftype) or pa.types.is_binary(ftype):
            continue
        if pa.types.is_floating(ftype) and (lo != lo or hi != hi):
            continue
        if pa.types.is_string(ftype):
            if isinstance(lo, bytes):
                lo, hi = lo.decode("utf-8", "replace"), hi.decode("utf-8", "replace")
            if len(lo) > 64 or len(hi) > 64:
                continue
        mins[name], maxs[name] = _stat_json(lo, ftype, up=False), _stat_json(hi, ftype, up=True)
    return {"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def _stat_json(value: Any, ftype: pa.DataType, up: bool) -> Any:
    if pa.types.is_timestamp(ftype):
        if isinstance(value, int):
            value = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=value)
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        micros = value.microsecond
        millis = micros // 1000 + (1 if up and micros % 1000 else 0)
        value = value.replace(microsecond=0) + dt.timedelta(milliseconds=millis)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if pa.types.is_date32(ftype):
        if isinstance(value, int):
            value = dt.date(1970, 1, 1) + dt.timedelta(days=value)
        return value.isoformat()
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value


def arrow_schema(schema: T.StructType) -> pa.Schema:
    """The Arrow schema Delta maps a Spark schema to (timestamps: microseconds UTC)."""
    return pa.schema([pa.field(f.name, _arrow_type(f.dataType), nullable=True) for f in schema.fields])


def _arrow_type(t: T.DataType) -> pa.DataType:
    simple = {
        T.StringType: pa.string(), T.LongType: pa.int64(), T.IntegerType: pa.int32(), T.ShortType: pa.int16(),
        T.DoubleType: pa.float64(), T.FloatType: pa.float32(), T.BooleanType: pa.bool_(),
        T.DateType: pa.date32(), T.TimestampType: pa.timestamp("us", tz="UTC"), T.BinaryType: pa.binary(),
    }
    for cls, at in simple.items():
        if isinstance(t, cls):
            return at
    if isinstance(t, T.ArrayType):
        return pa.list_(_arrow_type(t.elementType))
    if isinstance(t, T.StructType):
        return pa.struct([pa.field(f.name, _arrow_type(f.dataType)) for f in t.fields])
    raise SchemaMismatchError(f"no Arrow mapping for Spark type {t.simpleString()}")


class Warehouse:
    """All tables under `warehouse.root`, on the engine the conf selects."""

    def __init__(self, spark: SparkSession, cfg: Config, engine: str | None = None) -> None:
        self.spark = spark
        self.cfg = cfg
        self.root = cfg.warehouse
        self.engine = engine or resolve_engine(cfg)

    def table(self, name: str) -> DeltaTable:
        return DeltaTable(self.spark, table_spec(name), self.root, self.engine)

    def create_all(self) -> list[str]:
        """Create every table of DESIGN section 4 that does not exist yet; return those created."""
        self.root.mkdir(parents=True, exist_ok=True)
        return [name for name in all_table_names() if self.table(name).create()]

    def upgrade_all(self) -> dict[str, list[str]]:
        """Add to every existing table the columns its schema file gained; {table: columns added}."""
        added = {name: self.table(name).upgrade_schema() for name in all_table_names()}
        return {name: cols for name, cols in added.items() if cols}

    def versions(self, names: Iterable[str]) -> dict[str, int | None]:
        return {name: self.table(name).version() for name in names}
