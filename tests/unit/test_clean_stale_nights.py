"""Which feature nights a clean leaves stale: the rule behind clean's "rebuild" note."""

from __future__ import annotations

import datetime as dt

from streamrank.clean import stale_feature_nights

D = dt.date(2026, 11, 5)
COUNTS = {"silver_rows": 100, "quarantined_rows": 7, "duplicates_dropped": 3, "phases_s": {"reasons": 1.0}}
NIGHTS = [D + dt.timedelta(days=2), D, D + dt.timedelta(days=2), D + dt.timedelta(days=1)]


def test_a_rerun_with_the_same_outcome_leaves_nothing_stale():
    again = {**COUNTS, "phases_s": {"reasons": 2.0}}  # timings differ, the outcome does not
    asked = []
    assert stale_feature_nights(COUNTS, again, lambda: asked.append(1) or NIGHTS) == []
    assert not asked  # ops/job_runs is not read when nothing changed


def test_a_changed_outcome_makes_every_night_that_read_the_day_stale_once_each_in_order():
    replayed = {**COUNTS, "silver_rows": 104, "quarantined_rows": 3}
    assert stale_feature_nights(COUNTS, replayed, lambda: NIGHTS) == [D, D + dt.timedelta(days=1), D + dt.timedelta(days=2)]


def test_a_first_clean_of_a_day_that_later_nights_skipped_makes_them_stale():
    assert stale_feature_nights(None, COUNTS, lambda: NIGHTS[:1]) == [D + dt.timedelta(days=2)]
    assert stale_feature_nights(None, COUNTS, lambda: []) == []
