"""Warehouse upkeep: compact small files, then delete the files no snapshot needs any more.

Why a command of its own: the nightly only ever adds files. Every stage run appends one
small file to ops/job_runs (and clean, score and evaluate to ops/dq_results or
ops/model_eval), so those tables grow by thousands of tiny files a year; every re-run or
partition overwrite leaves the replaced files on disk, where time travel
(`sql --as-of-version`) and publish.py's RESTORE still need them for a while; and a write
killed before its commit leaves files no version references. `streamrank maintain`
compacts each table's partitions (one OPTIMIZE commit per table that had anything to
compact; rows and history unchanged) and vacuums what is older than the retention.

It holds the nightly's warehouse lock, so it never runs beside a nightly. A single stage
run started by hand does not take that lock: the retention (`delta.vacuum_retention_hours`,
default 168) is what keeps its in-flight files, as in Delta's own guard, so a retention
below MIN_RETENTION_HOURS needs --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamrank.errors import StreamrankError, UsageError
from streamrank.lock import WarehouseLock
from streamrank.schemas import all_table_names

if TYPE_CHECKING:
    from streamrank.context import Context

STAGE = "maintain"
#: below this, a vacuum could delete what an in-flight write or a restore still needs
MIN_RETENTION_HOURS = 168.0


@dataclass(frozen=True)
class TableUpkeep:
    """What maintain did to one table."""

    table: str
    files_compacted: int  # small files replaced by compaction
    files_written: int  # the files that replaced them
    files_vacuumed: int  # files (and abandoned staging dirs) deleted, or that would be in a dry run
    bytes_vacuumed: int

    def changed(self) -> bool:
        return bool(self.files_compacted or self.files_vacuumed)


def check_retention(retention_hours: float, force: bool) -> None:
    """UsageError (exit 2) for a retention that could delete files still needed, unless forced."""
    if retention_hours < 0:
        raise UsageError(f"--retention-hours must be >= 0, got {retention_hours:g}")
    if retention_hours < MIN_RETENTION_HOURS and not force:
        raise UsageError(
            f"retention {retention_hours:g} h (delta.vacuum_retention_hours or --retention-hours) is below"
            f" {MIN_RETENTION_HOURS:g} h: a write in flight, a restore of a killed run or `sql --as-of-version`"
            " may still need those files; pass --force to vacuum anyway"
        )


def maintain(ctx: Context, retention_hours: float | None = None, *, optimize: bool = True, dry_run: bool = False,
             force: bool = False, tables: list[str] | None = None) -> list[TableUpkeep]:
    """Compact (unless `optimize` is False) and vacuum every table; one result per table.

    A dry run changes nothing: it reports the files compaction would rewrite
    (`DeltaTable.compaction_plan`) and the files vacuum would delete.

    A table that fails is reported and the others are still done; the stage then fails
    (exit 1) naming each failed table.
    """
    from streamrank.context import stage_run

    hours = float(ctx.cfg["delta.vacuum_retention_hours"] if retention_hours is None else retention_hours)
    check_retention(hours, force)
    names = tables or all_table_names()
    done: list[TableUpkeep] = []
    failed: dict[str, str] = {}
    with WarehouseLock(ctx.cfg.warehouse, "nightly", ctx.run_id, command=STAGE), \
            stage_run(ctx, STAGE, dt.datetime.now(dt.UTC).date()) as run:
        for name in names:
            table = ctx.table(name)  # the context creates any missing table first
            version = table.version()
            try:
                done.append(_upkeep(table, name, hours, optimize, dry_run, ctx.run_id))
            except Exception as exc:  # noqa: BLE001 - one table's failure must not stop the others' upkeep
                failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                continue
            if table.version() != version:  # OPTIMIZE, or delta-rs's VACUUM START/END commits
                run.wrote(name, table.version())
        run.metrics.update({
            "retention_hours": hours, "dry_run": dry_run, "tables": len(done),
            "files_compacted": sum(t.files_compacted for t in done), "files_written": sum(t.files_written for t in done),
            "files_vacuumed": sum(t.files_vacuumed for t in done), "bytes_vacuumed": sum(t.bytes_vacuumed for t in done),
        })
        for t in done:
            if t.changed():
                packed = (f"would compact {t.files_compacted} files in {t.files_written} partitions" if dry_run
                          else f"compacted {t.files_compacted} files into {t.files_written}")
                verb = "would delete" if dry_run else "deleted"
                print(f"[maintain] {t.table}: {packed}; {verb} {t.files_vacuumed} files ({t.bytes_vacuumed / 2**20:.1f} MiB)")
        if failed:
            run.metrics["failed"] = failed
            raise StreamrankError("maintain failed for " + "; ".join(f"{n}: {m}" for n, m in failed.items()))
        run.message = (f"{len(done)} tables, {'nothing deleted (dry run)' if dry_run else 'done'}")
    return done


def _upkeep(table: Any, name: str, hours: float, optimize: bool, dry_run: bool, run_id: str) -> TableUpkeep:
    compacted = written = 0
    if optimize and dry_run:  # what compaction would rewrite: at least one new file per partition
        plan = table.compaction_plan()
        compacted, written = sum(plan.values()), len(plan)
    elif optimize:
        stats = table.optimize(commit_info={"stage": STAGE, "run_id": run_id})
        compacted, written = int(stats.get("numFilesRemoved", 0) or 0), int(stats.get("numFilesAdded", 0) or 0)
    # sizes first: in a real run the files are gone afterwards
    sizes = {p: _size(p) for p in table.vacuum(retention_hours=hours, dry_run=True)}
    removed = list(sizes) if dry_run else table.vacuum(retention_hours=hours)
    return TableUpkeep(name, compacted, written, len(removed), sum(sizes.get(p, 0) for p in removed))


def _size(path: str) -> int:
    """Bytes under `path` (a file, or a staging directory), 0 when it is already gone."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        return os.path.getsize(path)
    except OSError:
        return 0


def run(ctx: Context, args: argparse.Namespace) -> int:
    """`streamrank maintain`: errors propagate with their exit code (cli.main maps them)."""
    maintain(ctx, args.retention_hours, optimize=not args.no_optimize, dry_run=args.dry_run, force=args.force)
    return 0
