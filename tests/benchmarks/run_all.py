"""`make bench`: every stage against its reference, side by side, in one run.

Writes warehouse/reports/bench.json (a list of {name, ours_s, reference, reference_s,
ratio, target, ok}) and prints the same as a table. QUICK=1 shrinks every input so the
whole run takes minutes; the full run uses scale-1 days and the scale 1 vs 4 nightly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchmarks_common import format_rows  # noqa: E402

from streamrank.config import load_config  # noqa: E402
from streamrank.spark import build_session  # noqa: E402

ORDER = ["bench_ingest", "bench_clean", "bench_delta", "bench_loader", "bench_score", "bench_nightly"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these modules, e.g. bench_delta")
    args = parser.parse_args()
    cfg = load_config(None, ["spark.master=local[2]"])
    spark = build_session(cfg)
    rows: list[dict] = []
    failures = []
    with tempfile.TemporaryDirectory(prefix="streamrank-bench-", dir=str(Path.cwd())) as tmp:
        for name in args.only or ORDER:
            t0 = time.perf_counter()
            print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
            try:
                module = importlib.import_module(name)
                workdir = Path(tmp) / name
                workdir.mkdir()
                got = module.run(spark, cfg, workdir, bool(args.quick))
                rows.extend(got)
                print(format_rows(got), flush=True)
            except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
                failures.append(name)
                traceback.print_exc()
            print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = cfg.reports / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, default=str))
    print("\n" + format_rows(rows))
    print(f"\nwrote {out}")
    if failures:
        print(f"benchmarks that failed to run: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
