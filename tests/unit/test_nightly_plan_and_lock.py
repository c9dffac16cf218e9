"""Resumption plan and the one-nightly-per-warehouse lock (no Spark needed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from streamrank.errors import LockHeldError, UsageError
from streamrank.lock import WarehouseLock
from streamrank.nightly import STAGE_ORDER, plan


def todo(steps):
    return [s for s, run in steps if run]


def test_plan_skips_succeeded_stages():
    assert todo(plan({"ingest", "clean"}, force=False, from_stage=None)) == STAGE_ORDER[2:]
    assert todo(plan(set(STAGE_ORDER), force=False, from_stage=None)) == []


def test_plan_force_and_from():
    assert todo(plan(set(STAGE_ORDER), force=True, from_stage=None)) == STAGE_ORDER
    assert todo(plan(set(STAGE_ORDER), force=False, from_stage="score")) == ["score", "report"]
    with pytest.raises(UsageError, match="--from 'scoring'"):
        plan(set(), force=False, from_stage="scoring")


def test_second_holder_is_refused_with_holder_named(tmp_path):
    with WarehouseLock(tmp_path, run_id="first"):
        with pytest.raises(LockHeldError) as err:
            WarehouseLock(tmp_path, run_id="second").acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "run first" in msg
    assert not (tmp_path / "_locks" / "nightly.lock").exists()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / "_locks" / "nightly.lock"
    lock_file.parent.mkdir(parents=True)
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started_at": "2026-11-01T01:00:00+00:00"}))
    with WarehouseLock(tmp_path, run_id="next") as lock:
        assert json.loads(lock_file.read_text())["run_id"] == "next"
        assert lock.holder()["pid"] == os.getpid()
    assert list((tmp_path / "_locks").glob("nightly.lock.stale-*"))


def test_lock_of_live_other_process_blocks(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_file = tmp_path / "_locks" / "nightly.lock"
        lock_file.parent.mkdir(parents=True)
        lock_file.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started_at": "x", "run_id": "r"}))
        with pytest.raises(LockHeldError, match=f"pid {live.pid}"):
            WarehouseLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
