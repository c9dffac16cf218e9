"""Shared by the benchmark scripts: a session, a scratch dir, the side-by-side timing
order, the result table."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from streamrank.config import load_config
from streamrank.spark import build_session

A = TypeVar("A")
B = TypeVar("B")


def alternating(ours: Callable[[int], A], ref: Callable[[int], B], reps: int) -> tuple[list[A], list[B]]:
    """Each side `reps` times, given the repetition's index, the first of the pair swapping
    every repetition (ours, ref, ref, ours, ...); the results of each side in order.

    Why: timed one side after the other, the side that goes first pays the JVM warming
    up to a new plan and neither sees the same machine; a sub-second figure moved with the
    order alone (bench_delta's read: 1.16 and 1.24 in two full runs). Warm-ups stay with
    the caller: what warms a side differs (a tiny day for ingest, the same day for clean).
    """
    got_ours: list[A] = []
    got_ref: list[B] = []
    for i in range(reps):
        pair = [lambda i=i: got_ours.append(ours(i)), lambda i=i: got_ref.append(ref(i))]
        for step in pair if i % 2 == 0 else reversed(pair):
            step()
    return got_ours, got_ref


def format_rows(rows: list[dict]) -> str:
    head = f"{'name':16s} {'ours_s':>9s} {'reference_s':>11s} {'ratio':>8s} {'target':>8s}  ok   reference"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:16s} {r['ours_s']:9.2f} {r['reference_s']:11.2f} {r['ratio']:8.3f} {str(r['target']):>8s}  "
                     f"{'yes' if r['ok'] else 'NO ':3s}  {r['reference']}")
    return "\n".join(lines)


def standalone(run: Callable, argv: list[str] | None = None) -> int:
    """Run one benchmark module from the command line: `python tests/benchmarks/bench_X.py [--quick]`.

    Prints the table and the rows as JSON; exit 0 when every row met its target.
    """
    parser = argparse.ArgumentParser(description="one streamrank benchmark (make bench runs them all)")
    parser.add_argument("--quick", action="store_true", help="the reduced inputs of `make bench QUICK=1`")
    parser.add_argument("--workdir", help="where inputs and warehouses go (default: a temp dir, removed after)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    cfg = load_config(None, ["spark.master=local[2]", *args.set])
    spark = build_session(cfg)
    with tempfile.TemporaryDirectory(prefix="streamrank-bench-") as tmp:
        rows = run(spark, cfg, Path(args.workdir or tmp), args.quick)
    print(format_rows(rows))
    print(json.dumps(rows, indent=1, default=str))
    return 0 if all(r["ok"] for r in rows) else 1
