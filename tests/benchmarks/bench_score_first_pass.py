"""The score stage's model pass as the nightly runs it: once, in a fresh Spark session.

bench_score times warm passes in one long-lived session. A nightly's score stage starts a
new JVM and scores every viewer once, so what it pays is the first large pass. Each
repetition here is a child process with its own session: the same 2,000-viewer warm-up
as bench_score, then one pass over the large viewer file (the first pass), then another
(a warm one). The two ways of feeding the workers alternate:

- ``files``: score.score_files, the score stage's path (workers read their row groups);
- ``dataframe``: score.score_viewers over Spark's read of the same file (Spark reads,
  spreads and sorts the viewers, then converts them to Arrow for the workers).

Prints the medians and writes warehouse/reports/bench_score_first_pass.json. Not part of
`make bench` (six fresh sessions, about 7 minutes at 400,000 viewers):
``python tests/benchmarks/bench_score_first_pass.py [--quick] [--reps N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

KINDS = ("files", "dataframe")


def child(kind: str, workdir: Path, n: int) -> None:
    """One fresh session: warm up on 2,000 viewers, then time two passes over n viewers."""
    import bench_score as bs

    from streamrank.config import load_config
    from streamrank.score import build_payload, inference_precision
    from streamrank.spark import build_session

    cfg = load_config(None, ["spark.master=local[2]"])
    spark = build_session(cfg)
    champion, cands, vocab = bs.champion_and_candidates(cfg)
    payload, _ = build_payload(champion, cands, vocab, int(cfg["score.top_k"]), inference_precision(cfg["score.precision"]))
    bc = spark.sparkContext.broadcast(payload)
    timed = bs.time_ours if kind == "files" else bs.time_dataframe_path
    batch_size = int(cfg["score.batch_size"])
    timed(spark, workdir / "viewers_2000", bc, batch_size)
    first = timed(spark, workdir / f"viewers_{n}", bc, batch_size)
    warm = timed(spark, workdir / f"viewers_{n}", bc, batch_size)
    print(json.dumps({"kind": kind, "first_s": first, "warm_s": warm}), flush=True)
    spark.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="80,000 viewers instead of 400,000")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", choices=KINDS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir, args.n)
        return 0

    import bench_score as bs

    from streamrank.config import load_config

    cfg = load_config(None, [])
    n = 80_000 if args.quick else 400_000
    with tempfile.TemporaryDirectory(prefix="streamrank-first-pass-", dir=str(Path.cwd())) as tmp:
        workdir = Path(tmp)
        for size, seed in ((2_000, 2_000), (n, n)):
            bs.write_viewers(workdir / f"viewers_{size}", size, int(cfg["features.seq_len"]), seed=seed)
        runs: dict[str, list[dict]] = {k: [] for k in KINDS}
        for i in range(args.reps):
            for kind in KINDS if i % 2 == 0 else reversed(KINDS):
                out = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--n", str(n)],
                                     check=True, capture_output=True, text=True).stdout
                got = json.loads(out.strip().splitlines()[-1])
                runs[kind].append(got)
                print(f"{kind:<10} first {got['first_s']:6.2f} s   warm {got['warm_s']:6.2f} s", flush=True)
        result = {kind: {"first_s": statistics.median(r["first_s"] for r in rs),
                         "warm_s": statistics.median(r["warm_s"] for r in rs), "runs": rs} for kind, rs in runs.items()}
    result["n_viewers"] = n
    result["first_pass_dataframe_over_files"] = result["dataframe"]["first_s"] / result["files"]["first_s"]
    result["warm_pass_dataframe_over_files"] = result["dataframe"]["warm_s"] / result["files"]["warm_s"]
    out_path = cfg.reports / "bench_score_first_pass.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"medians over {args.reps}, {n} viewers: first pass files {result['files']['first_s']:.1f} s, "
          f"dataframe {result['dataframe']['first_s']:.1f} s ({result['first_pass_dataframe_over_files']:.2f}x); "
          f"warm pass files {result['files']['warm_s']:.1f} s, dataframe {result['dataframe']['warm_s']:.1f} s "
          f"({result['warm_pass_dataframe_over_files']:.2f}x)\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
