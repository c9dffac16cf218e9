"""`streamrank report --date D`: one static HTML page per night, opened from disk.

Everything is aggregated in Spark (tables can hold millions of rows) and only the small
results reach the driver, where matplotlib draws PNGs beside the page. The page answers
what an on-call engineer and an analyst ask each morning: did the data arrive, what was
rejected and why, did quality hold, is the model better than yesterday's and than the
baselines, what will viewers be shown tomorrow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from pyspark.sql import DataFrame  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from streamrank.context import Context, stage_run  # noqa: E402
from streamrank.errors import MissingInputError  # noqa: E402
from streamrank.registry import ModelRef, by_version  # noqa: E402

LAYERS = [
    ("bronze/viewer_events", "ingest_date"),
    ("silver/viewer_events", "event_date"),
    ("silver/quarantine", "ingest_date"),
    ("gold/training_examples", "as_of_date"),
    ("gold/user_product_rankings", "score_date"),
]
#: The stages of a night whose runs a report is about. Not `promote --version` or
#: `maintain`, which record the day they were run on, not a night of data.
NIGHT_STAGES = ("ingest", "clean", "features", "train", "evaluate", "score")


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _save(fig: plt.Figure, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return f'<img src="{name}" alt="{html.escape(name)}">'


class EvalPoint(NamedTuple):
    run_date: dt.date
    candidate: str
    metric: str
    value: float


def night_evaluations(rows: Sequence[dict[str, Any]], models: Mapping[str, ModelRef]) -> list[EvalPoint]:
    """The one evaluation per night the model chart shows, as (run_date, candidate, metric, value) rows.

    A night can hold several evaluations: a re-run after a retrain, or a backfill that
    evaluated a challenger trained on later nights on this night's holdout. The latter has
    trained on what it is scored on, so its figures flatter it; those evaluations are left
    out. Of the rest, the latest recorded one stands for the night, like a re-run's result.
    `models` maps challenger versions to their registry entries (missing: shown as they are).
    """
    runs: dict[tuple[dt.date, str], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["run_date"], r["run_id"]), []).append(r)

    def honest(key: tuple[dt.date, str]) -> bool:
        challenger = next((r["model_version"] for r in runs[key] if r["candidate"] == "challenger"), None)
        ref = models.get(challenger) if challenger is not None else None
        return ref is None or not ref.trained_after(key[0])

    recorded = {key: max(r["recorded_at"] for r in runs[key]) for key in runs if honest(key)}
    latest = {key[0]: key for key in sorted(recorded, key=recorded.__getitem__)}  # the latest run of each night wins
    return [EvalPoint(r["run_date"], r["candidate"], r["metric"], r["value"])
            for day in sorted(latest) for r in sorted(runs[latest[day]], key=lambda r: (r["candidate"], r["metric"]))]


def _registered(ctx: Context, versions: set[str]) -> dict[str, ModelRef]:
    """The registry entry of each of `versions` that is still registered."""
    refs = {v: by_version(ctx.cfg, v) for v in sorted(v for v in versions if v is not None)}
    return {v: ref for v, ref in refs.items() if ref is not None}


def _date_axis(ax: plt.Axes, fig: plt.Figure, first: dt.date, last: dt.date) -> None:
    """Ticks on whole days from first to last, labelled MM-DD (with the year where the range
    crosses one), at most about 15 of them.

    matplotlib's own choice puts ticks at 00:00 and 12:00 of each day, and pads a single
    day out to years either side.
    """
    half_day = dt.timedelta(hours=12)
    ax.set_xlim(dt.datetime.combine(first, dt.time()) - half_day, dt.datetime.combine(last, dt.time()) + half_day)
    ax.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, math.ceil(((last - first).days + 1) / 15))))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d" if first.year == last.year else "%Y-%m-%d"))
    fig.autofmt_xdate()


def _empty(text: str) -> str:
    return f'<p class="empty">{html.escape(text)}</p>'


def rows_per_day(ctx: Context, since: dt.date) -> dict[str, dict[dt.date, int]]:
    out: dict[str, dict[dt.date, int]] = {}
    for name, col in LAYERS:
        df = ctx.table(name).read().filter(F.col(col) >= F.lit(since))
        out[name] = {r[0]: r[1] for r in df.groupBy(col).count().collect()}
    return out


def quarantine_reasons(ctx: Context, date: dt.date) -> list[tuple[str, int]]:
    q = ctx.table("silver/quarantine").read().filter(F.col("ingest_date") == F.lit(date))
    rows = q.select(F.explode("reasons").alias("reason")).groupBy("reason").count().orderBy(F.desc("count")).collect()
    return [(r.reason, r["count"]) for r in rows]


def _distribution(df: DataFrame, col: str, bins: int = 20) -> tuple[list[float], list[int]]:
    """Histogram computed in Spark: bucket edges on [0, max] and counts per bucket."""
    hi = df.agg(F.max(col)).first()[0]
    if hi is None:
        return [], []
    hi = float(hi) or 1.0
    counts = dict(
        df.select(F.least(F.floor(F.col(col) / F.lit(hi) * bins), F.lit(bins - 1)).cast("int").alias("b"))
        .groupBy("b").count().collect()
    )
    return [hi * i / bins for i in range(bins)], [counts.get(i, 0) for i in range(bins)]


def build_report(ctx: Context, date: dt.date) -> Path:
    out = ctx.cfg.reports / date.isoformat()
    out.mkdir(parents=True, exist_ok=True)
    tomorrow = date + dt.timedelta(days=1)
    since = date - dt.timedelta(days=13)
    sections: list[str] = []

    # 1. rows per layer and day
    counts = rows_per_day(ctx, since)
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, per_day in counts.items():
        if per_day:
            days = sorted(per_day)
            ax.plot(days, [per_day[d] for d in days], marker="o", label=name)
    ax.set_title("Rows per layer and day")
    # log scale: a night's rankings (viewers x top K) outnumber its events by 10x or more,
    # and on a linear axis they flatten every other layer's line
    ax.set_yscale("log")
    ax.set_ylabel("rows (log scale)")
    ax.legend(fontsize=7)
    _date_axis(ax, fig, since, since + dt.timedelta(days=14))
    days = [since + dt.timedelta(days=i) for i in range(15)]  # the last column is D+1: tomorrow's rankings
    table_rows = [(name, *(counts[name].get(d, "") for d in days)) for name, _ in LAYERS]
    sections.append("<h2>Rows per layer and day</h2>" + _save(fig, out, "rows_per_day.png")
                    + _table(["table"] + [d.strftime("%m-%d") for d in days], table_rows))

    # 2. quarantine by reason
    reasons = quarantine_reasons(ctx, date)
    if reasons:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.barh([r for r, _ in reasons][::-1], [c for _, c in reasons][::-1], color="#c0504d")
        ax.set_title(f"Quarantined rows by reason, ingest date {date}")
        sections.append("<h2>Quarantine</h2>" + _save(fig, out, "quarantine_reasons.png") + _table(["reason", "rows"], reasons))
    else:
        sections.append("<h2>Quarantine</h2>" + _empty(f"no quarantined rows for {date}"))

    # 3. data quality
    dq = ctx.table("ops/dq_results").read().filter(F.col("run_date") == F.lit(date))
    dq_rows = dq.select("stage", "suite", "expectation", "severity", "success", "observed_value", "recorded_at") \
        .orderBy("recorded_at", "suite", "expectation").collect()
    failed = [r for r in dq_rows if not r.success]
    sections.append(
        f"<h2>Data quality</h2><p>{len(dq_rows)} expectation results, {len(failed)} failed "
        f"({sum(1 for r in failed if r.severity == 'critical')} critical). "
        f'<a href="../data_docs/index.html">GX data docs</a></p>'
        + (_table(["stage", "suite", "expectation", "severity", "success", "observed"], [r[:6] for r in dq_rows]) if dq_rows
           else _empty("no validations recorded for this date"))
    )

    # 4. model metrics over time, challenger vs champion vs baselines
    ev = ctx.table("ops/model_eval").read().filter(F.col("metric").isin("ndcg_at_10", "intent_auc")) \
        .select("run_id", "run_date", "recorded_at", "candidate", "model_version", "metric", "value").collect()
    models = _registered(ctx, {r.model_version for r in ev if r.candidate == "challenger"})
    ev_rows = night_evaluations([r.asDict() for r in ev], models)
    seen_holdout = sorted({f"v{ref.version} (trained as of {ref.trained_as_of})" for r in ev
                           if r.run_date == date and r.candidate == "challenger"
                           and (ref := models.get(r.model_version)) is not None and ref.trained_after(date)})
    left_out = (f"<p>Left out: the evaluation of {date} by {', '.join(seen_holdout)}, which trained on this "
                "night's holdout.</p>") if seen_holdout else ""
    if ev_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, metric in zip(axes, ("ndcg_at_10", "intent_auc"), strict=True):
            for cand in sorted({r.candidate for r in ev_rows if r.metric == metric}):
                pts = [(r.run_date, r.value) for r in ev_rows if r.metric == metric and r.candidate == cand]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cand)
            ax.set_title(metric)
            ax.legend(fontsize=7)
            _date_axis(ax, fig, ev_rows[0].run_date, ev_rows[-1].run_date)
        latest = [r for r in ev_rows if r.run_date == date]
        sections.append("<h2>Model metrics</h2>" + _save(fig, out, "model_metrics.png") + left_out
                        + _table(["candidate", "metric", "value"], [(r.candidate, r.metric, f"{r.value:.4f}") for r in latest]))
    else:
        sections.append("<h2>Model metrics</h2>" + left_out + _empty("no evaluations recorded yet"))

    # 5. tomorrow: score and intent distributions, top products and hosts
    ranks = ctx.table("gold/user_product_rankings").read().filter(F.col("score_date") == F.lit(tomorrow))
    intent = ctx.table("gold/user_intent_scores").read().filter(F.col("score_date") == F.lit(tomorrow))
    edges_p, counts_p = _distribution(ranks, "purchase_prob")
    edges_i, counts_i = _distribution(intent, "intent_score")
    if counts_p or counts_i:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, edges, cnts, title in ((axes[0], edges_p, counts_p, "purchase_prob of ranked products"),
                                       (axes[1], edges_i, counts_i, "viewer intent_score")):
            if cnts:
                ax.bar(edges, cnts, width=(edges[1] - edges[0]) if len(edges) > 1 else 0.05, align="edge")
            ax.set_title(title)
        sections.append(f"<h2>Scores for {tomorrow}</h2>" + _save(fig, out, "score_distributions.png"))
        streams = ctx.table("bronze/streams").read().filter(F.col("snapshot_date") == F.lit(tomorrow)).select("stream_id", "host_id")
        top = ranks.filter("rank <= 5")
        expected = F.round(F.sum("purchase_prob"), 1).alias("expected_buyers")
        top_products = top.groupBy("product_id").agg(F.count("*").alias("viewers"), expected) \
            .orderBy(F.desc("expected_buyers")).limit(15).collect()
        top_hosts = top.join(F.broadcast(streams), "stream_id").groupBy("host_id") \
            .agg(F.countDistinct("viewer_id").alias("viewers"), expected) \
            .orderBy(F.desc("expected_buyers")).limit(10).collect()
        sections.append("<h3>Top products (in viewers' top 5)</h3>" + _table(["product_id", "viewers", "expected buyers"], top_products)
                        + "<h3>Top hosts</h3>" + _table(["host_id", "viewers", "expected buyers"], top_hosts))
    else:
        sections.append(f"<h2>Scores for {tomorrow}</h2>" + _empty("no rankings published for tomorrow yet"))

    # 6. the night's stages
    runs = ctx.table("ops/job_runs").read().filter(F.col("run_date") == F.lit(date)) \
        .select("stage", "status", "exit_code", "started_at", "duration_s", "versions_written", "message").orderBy("started_at").collect()
    sections.append("<h2>Stage runs</h2>" + (_table(["stage", "status", "exit", "started", "seconds", "wrote", "message"], runs)
                                             if runs else _empty("no stage runs recorded")))

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>streamrank {date}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}img{{max-width:100%;display:block}}.empty{{color:#888}}</style>
</head><body><h1>streamrank nightly report {date}</h1>
<p>Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC from warehouse {html.escape(str(ctx.cfg.warehouse))}.</p>
{''.join(sections)}
<script>/* marks whether every plot loaded, so a headless browser check can read it from the DOM */
window.addEventListener("load", () => {{ const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesOk = imgs.every(i => i.complete && i.naturalWidth > 0); }});</script>
</body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _log_to_mlflow(ctx: Context, date: dt.date, report_dir: Path) -> str | None:
    """Attach the report to the MLflow run trained for D (or a report run if none)."""
    import mlflow

    from streamrank.registry import setup_mlflow

    setup_mlflow(ctx.cfg)
    runs = [r for r in ctx.table("ops/job_runs").to_arrow(partitions={"run_date": date}).to_pylist()
            if r["run_date"] == date and r["stage"] == "train" and r["status"] == "success" and r["mlflow_run_id"]]
    run_id = sorted(runs, key=lambda r: r["ended_at"])[-1]["mlflow_run_id"] if runs else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"report-{date}") as active:
        mlflow.log_artifacts(str(report_dir), artifact_path=f"report/{date}")
        return active.info.run_id


def require_night(ctx: Context, date: dt.date) -> None:
    """Refuse a night no stage has run for: most often a mistyped date.

    Its page would be a row of empty sections that looks like a night where everything
    came through empty, and it would add an MLflow run of its own. A night whose stages
    failed still gets its page: that is when the on-call engineer needs it most.
    """
    runs = ctx.table("ops/job_runs").read().filter(F.col("stage").isin(*NIGHT_STAGES))
    ran, latest = runs.agg(F.max(F.col("run_date") == F.lit(date)), F.max("run_date")).first()
    if ran:
        return
    where = f"warehouse {ctx.cfg.warehouse}"
    raise MissingInputError(
        f"no stage has run for {date} in {where} (ops/job_runs), so there is nothing to report; "
        + (f"the latest night with stage runs is {latest}" if latest else "no stage has run there yet")
        + f". Run `streamrank nightly --date {date}` first.")


def report(ctx: Context, date: dt.date) -> Path:
    with stage_run(ctx, "report", date) as run:
        require_night(ctx, date)
        page = build_report(ctx, date)
        run.mlflow_run_id = _log_to_mlflow(ctx, date, page.parent)
        run.metrics["page"] = str(page)
        run.message = f"report: {page}"
    return page


def run(ctx: Context, args: argparse.Namespace) -> int:
    report(ctx, args.date)
    return 0


