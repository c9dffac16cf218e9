"""Analyst access: every table as a Spark SQL view named <layer>_<table>.

Views point at the latest version unless `--as-of-version table=N` pins one, so a
question can be asked of yesterday's rankings as easily as of today's. Only the views
the query names are created (`named_tables`).

A mistake in the query is the analyst's to fix, so it is exit 2 with Spark's own words
(error class, position, suggestions) and no Python or JVM stack: a syntax error, an
unknown column or view (the views are listed), or an ANSI error on the data such as a
division by zero (the `try_` function that tolerates it is named). A pinned version the
table never had is exit 2 naming the table's latest version; one whose files `maintain`
has vacuumed is exit 5 (missing input), and so is a file that vanishes while the query
reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import deltalake
from py4j.protocol import Py4JError, Py4JJavaError
from pyspark.errors import AnalysisException, ParseException, PySparkException

from streamrank.context import Context
from streamrank.errors import MissingInputError, StreamrankError, UsageError
from streamrank.schemas import all_table_names, table_spec

#: SQLSTATE classes of errors the query itself causes (SQL:2016): 42 syntax error or
#: access rule violation (a typo, an unknown column or view), 22 data exception (ANSI mode:
#: division by zero, a cast that cannot parse, an index out of bounds)
QUERY_SQLSTATE_CLASSES = ("42", "22")


def register_views(ctx: Context, as_of: dict[str, int] | None = None, tables: Collection[str] | None = None) -> list[str]:
    """Create or replace a temp view per table (of `tables`, default all); returns the view names."""
    as_of = as_of or {}
    unknown = sorted(set(as_of) - set(all_table_names()))
    if unknown:
        raise UsageError(f"--as-of-version: unknown table(s) {unknown}; tables are {all_table_names()}")
    views = []
    for name in all_table_names():
        if tables is not None and name not in tables:
            continue
        table = ctx.table(name)
        version = as_of.get(name)
        if version is None:
            frame = table.read()
        else:
            latest = table.version()
            if latest is None or version > latest:
                have = "does not exist yet" if latest is None else f"is at version {latest}"
                raise UsageError(f"--as-of-version {name}={version}: {name} {have}")
            try:
                frame = table.read(version=version)
            except AnalysisException as exc:
                if exc.getCondition() == "PATH_NOT_FOUND":
                    raise MissingInputError(f"--as-of-version {name}={version}: {_first_line(str(exc))}\n`streamrank maintain`"
                                            " vacuums the files that no version within delta.vacuum_retention_hours needs;"
                                            " pin a newer version") from None
                raise UsageError(f"--as-of-version {name}={version}: {_first_line(str(exc))}") from None
            except deltalake.exceptions.DeltaError as exc:
                raise UsageError(f"--as-of-version {name}={version}: that version of {name} cannot be loaded"
                                 f" (its log entry may have been cleaned up): {_first_line(str(exc))}") from None
        frame.createOrReplaceTempView(table_spec(name).view_name)
        views.append(table_spec(name).view_name)
    return views


def named_tables(query: str) -> set[str]:
    """The tables whose view name appears in `query` as a word: the only ones worth registering.

    Each view costs a Delta snapshot and a Spark file listing (2.8 s for the 16 of a
    small warehouse, more as tables grow), and a question usually reads one or two. A
    name that only appears inside a string literal registers one view too many, which is
    harmless; Spark's parser is not asked, as its plan classes are internal.
    """
    return {name for name in all_table_names()
            if re.search(rf"(?<![\w$]){re.escape(table_spec(name).view_name)}(?![\w$])", query, re.IGNORECASE)}


def _parse_as_of(items: Sequence[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, sep, version = item.partition("=")
        if not sep or not version.isdigit():
            raise UsageError(f"--as-of-version {item!r}: expected TABLE=VERSION, e.g. gold/user_product_rankings=3")
        out[name.replace("_", "/", 1) if "/" not in name else name] = int(version)
    return out


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """An aligned plain-text table, the way a terminal user reads query results."""
    cells = [[("NULL" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def run_sql(ctx: Context, query: str, as_of_version: Sequence[str] | None = None, out: str | None = None,
            limit: int = 1000) -> int:
    path = Path(out) if out else None
    if path is not None and path.suffix not in (".csv", ".parquet"):
        raise UsageError(f"--out {out}: expected a .csv or .parquet file name")
    if path is not None and not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
        raise UsageError(f"--out {out}: {path.parent} is not a directory this user can write to")
    if limit < 0:
        raise UsageError(f"--limit {limit}: expected a number of rows >= 0")
    as_of = _parse_as_of(as_of_version)
    register_views(ctx, as_of, named_tables(query) | set(as_of))
    with _query_errors(ctx):
        df = ctx.spark.sql(query)
        if path is not None:
            frame = df.toPandas()
            if path.suffix == ".csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
            print(f"wrote {path} ({len(frame)} rows)")
            return 0
        rows = df.limit(limit + 1).collect()
    print(format_table(df.columns, [tuple(r) for r in rows[:limit]]))
    if len(rows) > limit:
        print(f"... more than {limit} rows; use --limit or --out")
    return 0


@contextlib.contextmanager
def _query_errors(ctx: Context) -> Iterator[None]:
    """Turn Spark's errors about the query into a StreamrankError with Spark's message only.

    Spark also logs a failed query with its whole stack, twice: PySpark's
    SQLQueryContextLogger, and the executor and scheduler (log4j) for an error in a task.
    The message raised here already says all of it, so both are quiet while the query
    runs; log4j goes back to `spark.log_level` afterwards.
    """
    quiet = logging.getLogger("SQLQueryContextLogger")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    ctx.spark.sparkContext.setLogLevel("FATAL")
    try:
        yield
    except PySparkException as exc:
        raise query_error(exc) from None
    except Py4JJavaError as exc:
        # a failed task reaches Python as the JVM's SparkException, not a PySparkException
        path = vanished_file(exc)
        if path is None:
            raise
        raise MissingInputError(
            f"the query failed: a file of a table it reads was removed while it ran: {path}\n"
            f"`streamrank maintain` vacuums files that no snapshot within its retention needs; run the query "
            f"again (it reads each table's latest version), or pin a version vacuum has kept") from None
    finally:
        quiet.setLevel(level)
        ctx.spark.sparkContext.setLogLevel(str(ctx.cfg["spark.log_level"]))


def query_error(exc: PySparkException) -> StreamrankError:
    """The error to report for a failed query: Spark's message without the plan or stack.

    Mistakes in the query (QUERY_SQLSTATE_CLASSES) are a UsageError (exit 2); anything
    else Spark reports about it stays exit 1.
    """
    condition = exc.getCondition() or ""
    state = exc.getSqlState() or ""
    # str() of a captured error is Spark's text with the query context (the caret under a
    # syntax error), and the JVM stack only when spark.sql.pyspark.jvmStacktrace.enabled
    message = str(exc).split("\n\nJVM stacktrace:", 1)[0].strip()
    if isinstance(exc, AnalysisException) and not isinstance(exc, ParseException):
        # the analyzed plan follows the position: a page of tree nobody asked for
        found = re.search(r"SQLSTATE: \w+(; line \d+ pos \d+)?", message)
        message = message[: found.end()] if found else message
    if condition == "TABLE_OR_VIEW_NOT_FOUND":
        views = ", ".join(table_spec(name).view_name for name in all_table_names())
        message += f"\nthe tables are views named <layer>_<table>: {views}"
    if state[:2] in QUERY_SQLSTATE_CLASSES:
        return UsageError(f"the query failed: {message}")
    return StreamrankError(f"the query failed: {message}")


def vanished_file(exc: Py4JJavaError) -> str | None:
    """The file Spark found gone while it read it (FAILED_READ_FILE.FILE_NOT_EXIST), else None."""
    java = exc.java_exception
    while java is not None:
        try:
            if str(java.getCondition() or "") == "FAILED_READ_FILE.FILE_NOT_EXIST":
                return str(java.getMessageParameters().get("path"))
        except Py4JError:  # a Java throwable that is not a SparkThrowable has no condition
            pass
        java = java.getCause()
    return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
