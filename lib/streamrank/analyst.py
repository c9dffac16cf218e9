"""Analyst access: every table as a Spark SQL view named <layer>_<table>.

Views point at the latest version unless `--as-of-version table=N` pins one, so a
question can be asked of yesterday's rankings as easily as of today's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from streamrank.context import Context
from streamrank.errors import UsageError
from streamrank.schemas import all_table_names, table_spec


def register_views(ctx: Context, as_of: dict[str, int] | None = None) -> list[str]:
    """Create or replace a temp view per table; returns the view names."""
    as_of = as_of or {}
    unknown = sorted(set(as_of) - set(all_table_names()))
    if unknown:
        raise UsageError(f"--as-of-version: unknown table(s) {unknown}; tables are {all_table_names()}")
    views = []
    for name in all_table_names():
        table = ctx.table(name)
        table.read(version=as_of.get(name)).createOrReplaceTempView(table_spec(name).view_name)
        views.append(table_spec(name).view_name)
    return views


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
    register_views(ctx, _parse_as_of(as_of_version))
    df = ctx.spark.sql(query)
    if out:
        path = Path(out)
        if path.suffix == ".csv":
            df.toPandas().to_csv(path, index=False)
        elif path.suffix == ".parquet":
            df.toPandas().to_parquet(path, index=False)
        else:
            raise UsageError(f"--out {out}: expected a .csv or .parquet file name")
        print(f"wrote {path}")
        return 0
    rows = df.limit(limit + 1).collect()
    print(format_table(df.columns, [tuple(r) for r in rows[:limit]]))
    if len(rows) > limit:
        print(f"... more than {limit} rows; use --limit or --out")
    return 0
