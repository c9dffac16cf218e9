"""Which evaluation of a night the report's model chart shows."""

from __future__ import annotations

import datetime as dt

from streamrank.registry import ModelRef
from streamrank.report import EvalPoint, night_evaluations

N1, N2, N3 = dt.date(2026, 11, 5), dt.date(2026, 11, 6), dt.date(2026, 11, 7)


def trained(**nights: dt.date) -> dict[str, ModelRef]:
    """Registry entries of versions v<N> trained as of the given nights."""
    return {k[1:]: ModelRef("m", k[1:], "r", {"as_of_date": str(day)}) for k, day in nights.items()}


def evaluation(run_id: str, night: dt.date, minute: int, challenger: str, ndcg: float) -> list[dict]:
    at = dt.datetime.combine(night, dt.time(2, minute), tzinfo=dt.UTC)
    return [{"run_id": run_id, "run_date": night, "recorded_at": at, "candidate": cand, "model_version": version,
             "metric": "ndcg_at_10", "value": value}
            for cand, version, value in (("challenger", challenger, ndcg), ("most_popular", None, 0.30))]


def test_a_backfills_evaluation_by_a_later_model_is_left_out_and_the_latest_honest_one_stands():
    rows = (evaluation("a", N1, 0, "3", 0.35)      # the night's own evaluation of v3
            + evaluation("b", N1, 9, "5", 0.45)    # a backfill: v5, trained as of N3, on N1's holdout
            + evaluation("c", N2, 0, "4", 0.36)
            + evaluation("d", N2, 5, "6", 0.37)    # train re-run for N2, evaluated again: the latest stands
            + evaluation("e", N3, 0, "9", 0.40))   # a version the registry no longer knows: shown
    assert night_evaluations(rows, trained(v3=N1, v4=N2, v5=N3, v6=N2)) == [
        EvalPoint(N1, "challenger", "ndcg_at_10", 0.35), EvalPoint(N1, "most_popular", "ndcg_at_10", 0.30),
        EvalPoint(N2, "challenger", "ndcg_at_10", 0.37), EvalPoint(N2, "most_popular", "ndcg_at_10", 0.30),
        EvalPoint(N3, "challenger", "ndcg_at_10", 0.40), EvalPoint(N3, "most_popular", "ndcg_at_10", 0.30),
    ]


def test_a_night_with_only_a_later_models_evaluation_has_no_point():
    rows = evaluation("a", N1, 0, "5", 0.45) + evaluation("b", N2, 0, "5", 0.41)
    assert [p.run_date for p in night_evaluations(rows, trained(v5=N2))] == [N2, N2]
