"""A stage's tables published as one unit: after a crash, all of its commits or none.

Delta commits one table at a time. A stage that publishes several tables (clean: silver
and quarantine; features: vocabularies, viewer features and training examples; score:
rankings and intent scores) therefore has a window between its first and its last commit
in which a kill leaves some tables new and the others old. DESIGN section 9 asks that a
killed stage leave every table at its previous version, so the window is journaled:

- `publication` writes `<warehouse>/_publish/<run_id>-<stage>.json` before the first commit: the
  writer's pid and host, and the version each of its tables had (the "before" version);
  it marks each table done after its commit and deletes the journal after the last one;
- an exception between the commits (a failed commit, Ctrl-C) rolls the committed tables
  back on the spot;
- a kill cannot run any code, so every stage run first calls `recover`: a journal whose
  writer is gone is resolved. If every table of it was committed, the publication was
  complete and stands; otherwise each table the dead run committed is restored to its
  before version (a Delta RESTORE, one more commit; history keeps the undone one).

A journal belongs to a dead writer when its pid is gone on this host, or, written on
another host (a cluster driver), when it is older than STALE_AFTER. A table that someone
else committed rows to after the dead run is not restored (that would undo their work;
vacuum and optimize commits change no rows and do not count): the journal is moved to
`_publish/unresolved/` and the warning names the versions to inspect. A restore that
fails (the old files vacuumed away) stops the stage run with the journal named and
kept, so every later run retries until a person resolves it.
Until the next stage run, readers can still see the half-published state; nothing else
in Delta can prevent that without a multi-table transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from streamrank.errors import StreamrankError
from streamrank.lock import pid_alive

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from streamrank.context import Context, StageRun
    from streamrank.delta import DeltaTable, StagedWrite, Where

log = logging.getLogger(__name__)

JOURNAL_DIR = "_publish"
STALE_AFTER = dt.timedelta(hours=12)  # a journal of another host older than this has a dead writer
#: commits that change no rows: a restore over them undoes nobody's data
MAINTENANCE = frozenset({"VACUUM START", "VACUUM END", "OPTIMIZE"})


class Publication:
    """The journal of one in-flight publication; `done(table)` after each commit."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc

    @classmethod
    def open(cls, ctx: Context, stage: str, tables: Sequence[str]) -> Publication:
        """Write the journal: who publishes, and each table's version before the first commit."""
        doc = {
            "run_id": ctx.run_id, "stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tables": {name: ctx.table(name).version() for name in tables}, "done": [],
        }
        pub = cls(journal_dir(ctx) / f"{ctx.run_id}-{stage}.json", doc)
        _write_json(pub.path, doc)
        return pub

    def done(self, table: str) -> None:
        """Record that `table` is committed (so a kill after the last commit keeps them all)."""
        if table not in self.doc["tables"]:
            raise ValueError(f"{table} is not one of this publication's tables {sorted(self.doc['tables'])}")
        self.doc["done"] = sorted({*self.doc["done"], table})
        _write_json(self.path, self.doc)


@contextmanager
def publication(ctx: Context, stage: str, tables: Sequence[str]) -> Iterator[Publication]:
    """Journal the commits of `tables` made inside the block; roll them back if it raises.

    Enter it right before the first commit (after any staged files are written), so the
    journal lives only as long as the commits.
    """
    pub = Publication.open(ctx, stage, tables)
    try:
        yield pub
    except BaseException:
        try:
            restored = _roll_back(ctx, pub.doc)
        except Exception as exc:  # noqa: BLE001 - keep the stage's own error; recover() retries later
            log.error("%s: could not roll back its partial publication (%s); the next stage run will retry", stage, exc)
        else:
            pub.path.unlink(missing_ok=True)
            if restored:
                log.warning("%s failed between its commits: restored %s", stage, _describe(restored))
        raise
    pub.path.unlink(missing_ok=True)


def publish_staged(ctx: Context, stage: str, run: StageRun, staged: Sequence[tuple[str, StagedWrite]]) -> None:
    """Commit staged writes, in order, as one journaled publication; recorded in `run`.

    Staging first and committing here keeps the journaled window to the commits alone
    (milliseconds on the rs engine); on the spark engine each commit also runs its write.
    A failure discards every write not yet committed and rolls back those that were.
    """
    try:
        with publication(ctx, stage, [name for name, _ in staged]) as pub:
            for name, write in staged:
                run.wrote(name, write.commit().version)
                pub.done(name)
    except BaseException:
        for _, write in staged:
            write.discard()
        raise


class StagedTables:
    """`with StagedTables(ctx, stage, run) as out:` `out.stage(...)` each table, then `out.publish()`.

    Leaving the block by an exception discards whatever was staged and not published.
    """

    def __init__(self, ctx: Context, stage: str, run: StageRun) -> None:
        self.ctx, self.stage_name, self.run = ctx, stage, run
        self.staged: list[tuple[str, StagedWrite]] = []

    def stage(self, name: str, df: DataFrame, where: Where, commit_info: Mapping[str, Any]) -> StagedWrite:
        """Write `df`'s files for `name` (replacing the rows `where` matches once published)."""
        write = self.ctx.table(name).stage_overwrite(df, where=where, commit_info=commit_info)
        self.staged.append((name, write))
        return write

    def publish(self) -> None:
        publish_staged(self.ctx, self.stage_name, self.run, self.staged)

    def __enter__(self) -> StagedTables:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            for _, write in self.staged:
                write.discard()


def recover(ctx: Context) -> list[str]:
    """Resolve the journals of dead writers; returns one line per journal, for the log.

    Each journal is claimed by renaming it first (only one of two concurrent stage runs
    wins), so no table is restored twice.
    """
    root = journal_dir(ctx)
    if not root.is_dir():
        return []
    lines = []
    for path in sorted(root.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # finished, or claimed by another recover, since the listing
        except (json.JSONDecodeError, OSError) as exc:
            lines.append(_set_aside(path, f"unreadable journal ({exc})"))
            continue
        if not _writer_gone(doc):
            continue
        claimed = path.with_name(f"{path.name}.recovering-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            continue
        try:
            lines.append(_resolve(ctx, claimed, doc))
        except BaseException:
            os.replace(claimed, path)  # unclaim: the next stage run tries again
            raise
    for line in lines:
        log.warning("%s", line)
    return lines


def journal_dir(ctx: Context) -> Path:
    return Path(ctx.cfg.warehouse) / JOURNAL_DIR


# ------------------------------------------------------------------------------ internals

def _resolve(ctx: Context, path: Path, doc: dict[str, Any]) -> str:
    who = f"{doc.get('stage')} run {doc.get('run_id')} (pid {doc.get('pid')} on {doc.get('host')})"
    if set(doc.get("done", [])) >= set(doc["tables"]):
        path.unlink(missing_ok=True)
        return f"{who} had committed all of {sorted(doc['tables'])} before it died: its publication stands"
    try:
        restored = _roll_back(ctx, doc)
    except _Conflict as exc:
        return _set_aside(path, f"{who} died mid-publication, but {exc}; nothing was restored")
    except Exception as exc:
        raise StreamrankError(
            f"{who} died mid-publication and its tables could not be restored: {type(exc).__name__}: {exc}. "
            f"The journal {path.name.split('.recovering-')[0]} stays in {path.parent} and every stage run retries; "
            f"to accept the tables as they are instead, move it to {path.parent / 'unresolved'}"
        ) from exc
    path.unlink(missing_ok=True)
    if not restored:
        return f"{who} died mid-publication: no table of it needed restoring (none committed, or already restored)"
    return f"{who} died mid-publication: restored {_describe(restored)}"


class _Conflict(Exception):
    pass


def _roll_back(ctx: Context, doc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Restore every table the journal's run committed to its before version.

    Checks all tables first, so a conflict on one restores none. Returns
    {table: (before version, version of the restore commit)}.
    """
    run_id = doc["run_id"]
    plan: list[tuple[DeltaTable, int]] = []
    for name, before in doc["tables"].items():
        table = ctx.table(name)
        current = table.version()
        if current is None or before is None or current <= before:
            continue
        newer = [h for h in table.history(current - before) if int(h["version"]) > before]
        if _meta(newer[0]).get("rolled_back_run") == run_id:
            continue  # restored by an earlier recovery that failed on another table
        ours = [h for h in newer if _run_of(h) == run_id]
        if not ours:
            continue
        first_ours = min(int(h["version"]) for h in ours)
        others = sorted(int(h["version"]) for h in newer if _run_of(h) != run_id and int(h["version"]) > first_ours
                        and h.get("operation") not in MAINTENANCE)
        if others:
            raise _Conflict(f"{name} has commits of other runs after it (v{others[0]}): inspect v{before}..v{current}")
        plan.append((table, before))
    info = {"stage": "recover", "run_id": ctx.run_id, "rolled_back_run": run_id}
    return {t.spec.name: (before, t.restore(before, commit_info=info)) for t, before in plan}


def _meta(entry: dict[str, Any]) -> dict[str, Any]:
    """The commit_info a streamrank commit carries (empty for other writers' commits)."""
    try:
        meta = json.loads(entry.get("userMetadata") or "{}")
    except (json.JSONDecodeError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _run_of(entry: dict[str, Any]) -> str | None:
    meta = _meta(entry)
    return None if meta.get("rolled_back_run") else meta.get("run_id")


def _writer_gone(doc: dict[str, Any]) -> bool:
    if doc.get("host") == socket.gethostname():
        return not pid_alive(int(doc.get("pid", -1)))
    try:
        started = dt.datetime.fromisoformat(doc["started_at"])
    except (KeyError, TypeError, ValueError):
        return True
    return dt.datetime.now(dt.UTC) - started > STALE_AFTER


def _set_aside(path: Path, why: str) -> str:
    """Move a journal that cannot be resolved automatically out of the way, keeping it for a person."""
    dest = path.parent / "unresolved" / path.name.split(".recovering-")[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return f"journal {dest.name}: {why}; kept as {dest}"


def _describe(restored: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{name} to v{before} (as v{new})" for name, (before, new) in sorted(restored.items()))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write then rename: a reader sees the old journal or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, path)
