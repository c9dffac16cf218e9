"""One nightly per warehouse: an exclusive lock file under the warehouse.

The lock is created with O_CREAT|O_EXCL, so two processes can never both hold it. A lock
whose holder is a dead process on this host is stale: it is renamed away (an atomic step
only one contender can win) and taken over, so a run killed with -9 never blocks the next
night. A lock held by a live process, or by another host, is reported with its holder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from pathlib import Path
from types import TracebackType

from streamrank.errors import LockHeldError


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WarehouseLock:
    """Context manager holding `<warehouse>/_locks/<name>.lock` for the duration of a run."""

    def __init__(self, warehouse: Path, name: str = "nightly", run_id: str = "", command: str | None = None) -> None:
        self.path = warehouse / "_locks" / f"{name}.lock"
        self.run_id = run_id
        self.command = command or name  # who holds it, for the message another contender gets
        self.token = uuid.uuid4().hex

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {"pid": -1, "host": "unknown", "started_at": "unknown", "corrupt": True}

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id, "token": self.token,
                "command": self.command,
                "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        return True

    def _stale(self, info: dict) -> bool:
        if info.get("corrupt"):
            return True
        return info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1)))

    def acquire(self) -> None:
        for _ in range(3):
            if self._try_create():
                return
            info = self.holder()
            if info is None:
                continue  # released between our attempts: try again
            if not self._stale(info):
                raise LockHeldError(
                    f"another {info.get('command', 'nightly')} holds {self.path}: pid {info.get('pid')} on {info.get('host')} "
                    f"since {info.get('started_at')} (run {info.get('run_id', '?')})"
                )
            aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, aside)  # only one contender wins this rename
            except FileNotFoundError:
                continue
            print(f"[lock] took over a stale lock of dead pid {info.get('pid')} on {info.get('host')} (kept as {aside.name})")
        raise LockHeldError(f"could not acquire {self.path} after 3 attempts (contended)")

    def release(self) -> None:
        info = self.holder()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WarehouseLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
