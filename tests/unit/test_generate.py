"""Tests of the synthetic landing generator.

They re-read the written files the way a downstream stage would (plain and gzip, line by
line, bytes first) and check the contract: the layout, that clean data references that
day's catalog and schedule, that every fault count in the ledger can be observed exactly,
the rate limits that keep normal viewers apart from bots, determinism across call
patterns, and that the signals a model should learn are really in the data.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamrank import generate as gen
from streamrank.errors import UsageError
from streamrank.generate import EVENT_TYPES, generate

START = dt.date(2026, 11, 1)
SCALE = 0.005
KEYS = ["event_id", "viewer_id", "session_id", "stream_id", "host_id", "product_id", "event_type",
        "event_ts", "dwell_ms", "price_paid", "quantity", "device_id", "ip", "comment_text",
        "app_version"]
PRODUCT_TYPES = {"view_product", "click_product", "add_to_cart", "purchase"}


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("clean")
    return root, generate(root, START, 3, scale=SCALE, faults=False, seed=11)


@pytest.fixture(scope="module")
def faulty_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faulty")
    return root, generate(root, START, 3, scale=SCALE, faults=True, seed=7)


def _days(n: int) -> list[dt.date]:
    return [START + dt.timedelta(days=k) for k in range(n)]


def _raw_lines(root: Path, d: dt.date) -> list[tuple[str, bytes]]:
    """(file name, raw line without the newline) for every line of a day, in file order."""
    out = []
    for f in sorted((root / "events" / f"date={d.isoformat()}").iterdir()):
        data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        if data:
            assert data.endswith(b"\n"), f
        for line in data.split(b"\n")[:-1] if data else []:
            assert line.strip(), f"blank line in {f}"
            out.append((f.name, line))
    return out


def _utc(ts: str) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    assert t.tzinfo is not None, ts
    return t.tz_convert("UTC")


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
def test_layout_and_ledger_shape(clean_root: tuple[Path, dict]) -> None:
    root, ledger = clean_root
    assert ledger == json.loads((root / "_ledger" / "ledger.json").read_text())
    assert ledger["seed"] == 11 and ledger["scale"] == SCALE
    assert sorted(ledger["dates"]) == [d.isoformat() for d in _days(3)]
    for d in _days(3):
        iso = d.isoformat()
        assert (root / "catalog" / f"products_{iso}.csv").exists()
        entry = ledger["dates"][iso]
        names = sorted(p.name for p in (root / "events" / f"date={iso}").iterdir())
        assert names == sorted(Path(f["path"]).name for f in entry["files"])
        assert len(names) >= 4 and any(n.endswith(".gz") for n in names) and any(n.endswith(".jsonl") for n in names)
        for f in entry["files"]:
            p = root / f["path"]
            assert p.name.endswith(".gz") == f["gz"]
            if f["gz"]:
                with gzip.open(p, "rt", encoding="utf-8") as fh:  # a normal gzip reader works
                    assert sum(1 for _ in fh) == f["lines"]
        assert entry["lines"] == sum(f["lines"] for f in entry["files"]) == len(_raw_lines(root, d))
        assert set(entry["faults"]) >= set(gen.FAULT_KINDS)
        assert all(v == 0 for v in entry["faults"].values()) and entry["empty_files"] == 0
        assert entry["lines"] == entry["valid_events"]
        assert entry["late_events"] == 0 if d == START else entry["late_events"] > 0
    for d in _days(4):  # the schedule of the day after the last day is there too
        for name in (f"streams_{d.isoformat()}.csv", f"stream_products_{d.isoformat()}.csv"):
            assert (root / "schedule" / name).stat().st_size > 0
    assert not (root / "catalog" / f"products_{_days(4)[-1].isoformat()}.csv").exists()


def test_clean_events_reference_that_days_catalog_and_schedule(clean_root: tuple[Path, dict]) -> None:
    root, ledger = clean_root
    seen_ids: set[str] = set()
    prev_products: set[str] = set()
    for d in _days(3):
        iso = d.isoformat()
        cat = pd.read_csv(root / "catalog" / f"products_{iso}.csv", dtype={"product_id": str})
        assert list(cat.columns) == ["product_id", "title", "category", "brand", "list_price", "launch_date"]
        assert (pd.to_datetime(cat.launch_date).dt.date <= d).all() and cat.product_id.is_unique
        assert set(prev_products) <= set(cat.product_id)  # the catalog only grows
        new = cat[pd.to_datetime(cat.launch_date).dt.date == d]
        assert len(new) > 0, "new launches every day (cold start)"
        prev_products = set(cat.product_id)
        late = 0
        for _fname, raw in _raw_lines(root, d):
            text = raw.decode("utf-8")
            obj = json.loads(text)
            assert list(obj) == KEYS
            assert obj["event_type"] in EVENT_TYPES
            assert obj["event_id"] not in seen_ids
            seen_ids.add(obj["event_id"])
            t = _utc(obj["event_ts"])
            ev_date = t.date()
            if ev_date != d:
                assert ev_date == d - dt.timedelta(days=1)
                late += 1
            et = obj["event_type"]
            assert isinstance(obj["dwell_ms"], int) and 0 <= obj["dwell_ms"] <= 86_400_000
            assert (obj["product_id"] is None) == (et in ("enter_stream", "leave_stream"))
            assert (obj["quantity"] is not None) == (et in ("add_to_cart", "purchase"))
            assert (obj["price_paid"] is not None) == (et == "purchase")
            assert (obj["comment_text"] is not None) == (et == "comment")
        assert late == ledger["dates"][iso]["late_events"]
    # referential integrity against the schedule of each event's own (UTC) date
    for d in _days(3):
        iso = d.isoformat()
        streams = pd.read_csv(root / "schedule" / f"streams_{iso}.csv")
        slots = pd.read_csv(root / "schedule" / f"stream_products_{iso}.csv", dtype={"product_id": str})
        catalog = set(pd.read_csv(root / "catalog" / f"products_{iso}.csv").product_id)
        assert set(slots.product_id) <= catalog
        host_of = dict(zip(streams.stream_id, streams.host_id, strict=True))
        win = {(s, p): (_utc(a), _utc(b), lp) for s, p, a, b, lp in slots.itertuples(index=False)}
        span = {s: (_utc(a), _utc(b)) for s, _, a, b in streams.itertuples(index=False)}
        events = [json.loads(raw) for day in _days(3) for _, raw in _raw_lines(root, day)]
        mine = [e for e in events if _utc(e["event_ts"]).date() == d]
        assert mine
        for e in mine:
            t = _utc(e["event_ts"])
            assert host_of[e["stream_id"]] == e["host_id"]
            a, b = span[e["stream_id"]]
            assert a <= t <= b
            if e["product_id"] is not None:
                s0, s1, live = win[(e["stream_id"], e["product_id"])]
                assert s0 <= t < s1, (e, s0, s1)  # a view (and any product event) is inside its slot
                if e["event_type"] == "purchase":
                    assert e["price_paid"] == pytest.approx(round(live * e["quantity"], 2))
                    assert 1 <= e["quantity"] <= 3


def _classify_day(root: Path, d: dt.date, catalog_ids: set[str], stream_ids: set[str],
                  earlier_ids: set[str]) -> tuple[Counter, list[dict]]:
    """Count every fault kind of a day's files by re-parsing them, independently of the
    generator; return the counts and the structurally valid, unique, non-bot events."""
    c: Counter = Counter()
    ok: list[tuple[str, dict]] = []
    for fname, raw in _raw_lines(root, d):
        assert b"\n" not in raw and b"\r" not in raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            c["non_utf8"] += 1
            obj = json.loads(raw.decode("utf-8", errors="replace"))  # otherwise valid JSON
            assert list(obj) == KEYS and obj["event_type"] == "comment"
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            c["malformed_json"] += 1
            continue
        if any(k not in obj for k in ("event_id", "viewer_id", "event_type", "event_ts")):
            c["missing_required"] += 1
            assert len(obj) == len(KEYS) - 1
            continue
        assert list(obj) == KEYS
        if obj["event_type"] not in EVENT_TYPES:
            c["unknown_event_type"] += 1
            continue
        if any(isinstance(obj[k], str) for k in ("dwell_ms", "quantity", "price_paid")):
            c["wrong_type"] += 1
            continue
        if not 0 <= obj["dwell_ms"] <= 86_400_000:
            c["bad_dwell"] += 1
            continue
        day = _utc(obj["event_ts"]).date()
        if day >= d + dt.timedelta(days=2):
            c["future_ts"] += 1
            assert day <= d + dt.timedelta(days=30)
            continue
        if day < d - dt.timedelta(days=60):
            c["past_ts"] += 1
            continue
        assert day in (d, d - dt.timedelta(days=1))
        if obj["product_id"] is not None and obj["product_id"] not in catalog_ids:
            c["unknown_product"] += 1
            assert obj["event_type"] in PRODUCT_TYPES
            continue
        if obj["stream_id"] not in stream_ids:
            c["unknown_stream"] += 1
            continue
        ok.append((fname, obj))
    # duplicates: extra copies of an event_id (within one file / across files or days)
    by_id: dict[str, list[str]] = defaultdict(list)
    first: dict[str, dict] = {}
    for fname, obj in ok:
        by_id[obj["event_id"]].append(fname)
        first.setdefault(obj["event_id"], obj)
    unique = []
    for eid, files in by_id.items():
        n_files = len(set(files))
        c["dup_within_file"] += len(files) - n_files
        c["dup_replay"] += n_files if eid in earlier_ids else n_files - 1
        if eid not in earlier_ids:
            unique.append(first[eid])
    # bots: more than 30 events in one calendar minute (UTC) on this day
    per_min = Counter((o["viewer_id"], _utc(o["event_ts"]).floor("min")) for o in unique)
    bots = {v for (v, _), n in per_min.items() if n > 30}
    c["bot_events"] = sum(1 for o in unique if o["viewer_id"] in bots)
    return c, [o for o in unique if o["viewer_id"] not in bots]


def test_fault_counts_are_exact_and_observable(faulty_root: tuple[Path, dict]) -> None:
    root, ledger = faulty_root
    catalog_ids = set()
    stream_ids = set()
    for p in (root / "catalog").glob("*.csv"):
        catalog_ids |= set(pd.read_csv(p).product_id)
    for p in (root / "schedule").glob("streams_*.csv"):
        stream_ids |= set(pd.read_csv(p).stream_id)
    earlier: set[str] = set()
    valid_all = []
    for d in _days(3):
        entry = ledger["dates"][d.isoformat()]
        faults = entry["faults"]
        counts, valid = _classify_day(root, d, catalog_ids, stream_ids, earlier)
        for kind in gen.FAULT_KINDS:
            assert counts[kind] == faults[kind], (d, kind, counts[kind], faults[kind])
            assert faults[kind] > 0, (d, kind)
        if d > START:
            assert entry["late_events"] > 0
        assert entry["lines"] == entry["valid_events"] + sum(v for k, v in faults.items() if k != "empty_files")
        assert entry["valid_events"] == len(valid)
        n_empty = sum(1 for f in (root / "events" / f"date={d.isoformat()}").iterdir() if f.stat().st_size == 0)
        assert n_empty == entry["empty_files"] == faults["empty_files"] > 0
        share = (entry["lines"] - entry["valid_events"]) / entry["lines"]
        assert share < 0.10, share
        earlier |= {json.loads(line)["event_id"] for _, line in _raw_lines(root, d) if _parses(line)}
        valid_all += valid
    # normal viewers stay far below the bot rule, in sliding windows too
    df = pd.DataFrame(valid_all)
    df["t"] = df.event_ts.map(_utc)
    df = df.sort_values(["viewer_id", "t"])
    for _, g in df.groupby("viewer_id"):
        t = g.t.to_numpy(dtype="datetime64[ms]").astype(np.int64)
        lo = np.searchsorted(t, t - 60_000, "right")
        assert (np.arange(len(t)) - lo + 1).max() <= 10
        tb = t[(g.event_type == "purchase").to_numpy()]
        if len(tb):
            assert (np.arange(len(tb)) - np.searchsorted(tb, tb - 3_600_000, "right") + 1).max() <= 5


def _parses(line: bytes) -> bool:
    try:
        obj = json.loads(line.decode("utf-8"))
        return "event_id" in obj
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def test_without_faults_every_fault_count_is_zero_and_lines_are_valid(clean_root: tuple[Path, dict]) -> None:
    root, ledger = clean_root
    catalog_ids = set()
    stream_ids = set()
    for p in (root / "catalog").glob("*.csv"):
        catalog_ids |= set(pd.read_csv(p).product_id)
    for p in (root / "schedule").glob("streams_*.csv"):
        stream_ids |= set(pd.read_csv(p).stream_id)
    earlier: set[str] = set()
    for d in _days(3):
        counts, valid = _classify_day(root, d, catalog_ids, stream_ids, earlier)
        assert sum(counts.values()) == 0, counts
        assert len(valid) == ledger["dates"][d.isoformat()]["valid_events"]
        earlier |= {o["event_id"] for o in valid}


def test_bots_are_inhuman(faulty_root: tuple[Path, dict]) -> None:
    root, ledger = faulty_root
    d = START + dt.timedelta(days=1)
    events = [json.loads(line) for _, line in _raw_lines(root, d) if _parses(line)]
    events = [e for e in events if "viewer_id" in e and "event_ts" in e]
    per_viewer: dict[str, list[pd.Timestamp]] = defaultdict(list)
    for e in events:
        per_viewer[e["viewer_id"]].append(_utc(e["event_ts"]))
    bots = {v: ts for v, ts in per_viewer.items()
            if max(Counter(t.floor("min") for t in ts).values()) > 30}
    assert bots
    for ts in bots.values():
        ts.sort()
        assert len(ts) >= 120 and (ts[-1] - ts[0]).total_seconds() <= 120


def test_deterministic_and_independent_of_call_pattern(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, START, 2, scale=SCALE, faults=True, seed=3)
    generate(b, START, 2, scale=SCALE, faults=True, seed=3)
    fa = _all_files(a)
    assert fa == _all_files(b)
    # one day at a time gives the same bytes, and the day-after schedule written on day 1
    # is the schedule day 2 really has
    generate(c, START, 1, scale=SCALE, faults=True, seed=3)
    sched2 = (c / "schedule" / "stream_products_2026-11-02.csv").read_bytes()
    generate(c, START + dt.timedelta(days=1), 1, scale=SCALE, faults=True, seed=3)
    assert (c / "schedule" / "stream_products_2026-11-02.csv").read_bytes() == sched2
    assert _all_files(c) == fa
    # another seed is another world
    generate(tmp_path / "d", START, 1, scale=SCALE, faults=True, seed=4)
    assert _all_files(tmp_path / "d")["catalog/products_2026-11-01.csv"] != fa["catalog/products_2026-11-01.csv"]


def test_ledger_merges_and_rejects_another_world(tmp_path: Path) -> None:
    generate(tmp_path, START, 1, scale=SCALE, seed=5)
    # skipping a day: the gap is simulated (not written), later days still get late events
    ledger = generate(tmp_path, START + dt.timedelta(days=2), 1, scale=SCALE, faults=True, seed=5)
    assert sorted(ledger["dates"]) == ["2026-11-01", "2026-11-03"]
    assert ledger["dates"]["2026-11-03"]["late_events"] > 0
    assert not (tmp_path / "events" / "date=2026-11-02").exists()
    assert ledger["dates"]["2026-11-01"]["faults"]["bot_events"] == 0
    with pytest.raises(UsageError, match="already holds seed=5"):
        generate(tmp_path, START, 1, scale=SCALE, seed=6)
    with pytest.raises(UsageError, match="already holds seed=5"):
        generate(tmp_path, START, 1, scale=0.01, seed=5)
    with pytest.raises(UsageError, match="precedes this landing root's world epoch 2026-11-01"):
        generate(tmp_path, START - dt.timedelta(days=1), 1, scale=SCALE, seed=5)


@pytest.mark.parametrize(("args", "says"), [
    (["--days", "0"], "--days must be >= 1, got 0"),
    (["--scale", "-1"], "--scale must be > 0, got -1.0"),
    (["--scale", "nan"], "--scale must be > 0, got nan"),
    (["--seed", "-3"], "--seed must be >= 0, got -3"),
])
def test_bad_generate_settings_are_exit_2_and_write_nothing(tmp_path: Path, capsys, args: list[str], says: str) -> None:
    from streamrank.cli import main

    landing = tmp_path / "landing"
    assert main(["generate", "--start", str(START), "--set", f"landing.root={landing}", *args]) == 2
    assert capsys.readouterr().err.strip() == f"streamrank generate: error: {says}"
    assert not landing.exists()


# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simulated() -> tuple[gen._World, gen._Day, gen._Day, gen._State]:
    """Two days of a larger world, simulated in memory (no files): enough purchases for
    statistics while staying fast."""
    world = gen._World(seed=7, scale=0.05, epoch=START)
    d1, s1 = gen._simulate(world, START, world.schedule(START), gen._State())
    d2, _ = gen._simulate(world, START + dt.timedelta(days=1), world.schedule(START + dt.timedelta(days=1)), s1)
    return world, d1, d2, s1


def _views(world: gen._World, day: gen._Day) -> pd.DataFrame:
    ev = day.ev
    views = ev["type"] == gen.VIEW
    bought_pairs = set(ev["pair"][ev["type"] == gen.BUY].tolist())
    v, p = ev["viewer"][views], ev["prod"][views]
    live = pd.Series(day.sched.slot_live_cents, index=[day.sched.slot_stream, day.sched.slot_product])
    price = live.loc[list(zip(ev["stream"][views], p, strict=True))].to_numpy() / 100.0
    return pd.DataFrame({
        "aff": world.v["pref"][v, world.p_cat[p]],
        "over": np.log(price / gen._TIER_BUDGET[world.v["tier"][v]]),
        "bought": np.isin(ev["pair"][views], list(bought_pairs)),
        "dwell": ev["dwell"][views],
    })


def test_purchases_rise_with_affinity_and_fall_with_price_over_tier(simulated) -> None:
    world, d1, d2, _ = simulated
    df = pd.concat([_views(world, d1), _views(world, d2)])
    assert df.bought.sum() > 300
    q = df.aff.quantile([1 / 3, 2 / 3]).to_numpy()
    low, high = df[df.aff <= q[0]].bought.mean(), df[df.aff >= q[1]].bought.mean()
    assert high > 2.5 * low, (low, high)
    within, far_over = df[df.over <= 0].bought.mean(), df[df.over >= 1.0].bought.mean()
    assert within > 2.5 * far_over, (within, far_over)
    # dwell is longer on liked products (a signal available without the purchase label)
    assert df[df.aff >= q[1]].dwell.median() > df[df.aff <= q[0]].dwell.median()


def test_funnel_and_decay_signals(simulated) -> None:
    world, d1, d2, s1 = simulated
    for day in (d1, d2):
        ev = day.ev
        n = {t: int((ev["type"] == t).sum()) for t in range(10)}
        assert n[gen.VIEW] > n[gen.CLICK] > n[gen.CART] > n[gen.BUY] > 0
        # every purchase follows a cart and a click of the same slot view, in order
        for a, b in ((gen.CLICK, gen.CART), (gen.CART, gen.BUY)):
            ta = dict(zip(ev["pair"][ev["type"] == a], ev["t"][ev["type"] == a], strict=True))
            for pair, t in zip(ev["pair"][ev["type"] == b], ev["t"][ev["type"] == b], strict=True):
                assert pair in ta and ta[pair] < t
    # time decay: a category clicked on day 1 is bought more on day 2 by the same viewer
    e1, e2 = d1.ev, d2.ev
    clicked = set(zip(e1["viewer"][e1["type"] == gen.CLICK], world.p_cat[e1["prod"][e1["type"] == gen.CLICK]], strict=True))
    v2 = _views(world, d2)
    views2 = e2["type"] == gen.VIEW
    v2["prior"] = [(v, c) in clicked for v, c in zip(e2["viewer"][views2], world.p_cat[e2["prod"][views2]], strict=True)]
    assert v2[v2.prior].bought.mean() > 1.5 * v2[~v2.prior].bought.mean()
    # sequences: every trigger purchase of day 1 (a phone, ...) is carried to day 2, where
    # it raises its complements (cases, chargers, ...) for that viewer
    buys = e1["type"] == gen.BUY
    cats = world.p_cat[e1["prod"][buys]]
    trig = gen._IS_TRIGGER[cats]
    assert trig.sum() > 0
    keys = e1["viewer"][buys][trig] * gen._NT + gen._TRIGGER_OF_CAT[cats[trig]]
    assert np.isin(keys, s1.trig_k).all()
    assert (s1.trig_v > 0.7).sum() >= len(np.unique(keys)) * 0.9  # 3-day half-life: still strong


def test_rate_limiter_and_decay_helpers() -> None:
    # a crowded minute of one viewer loses its social events first, then slot views
    t = np.arange(20) * 1000
    ev = {"viewer": np.zeros(20, np.int64), "t": t, "type": np.array([gen.LIKE] * 10 + [gen.VIEW] * 10),
          "pair": np.array([-1] * 10 + list(range(10))), "sess": np.zeros(20, np.int64)}
    out = gen._limit_rates(ev)
    lo = np.searchsorted(out["t"], out["t"] - 60_000, "right")
    assert (np.arange(len(out["t"])) - lo + 1).max() == gen._MAX_EVENTS_PER_MIN
    kept = out["type"].tolist()
    assert kept.count(gen.VIEW) == 8 and gen.LIKE not in kept  # socials go first
    # decayed sums equal the direct definition
    rng = np.random.default_rng(0)
    grp = np.sort(rng.integers(0, 5, 40))
    tt = np.concatenate([np.sort(rng.uniform(0, 86400, (grp == g).sum())) for g in range(5)])
    w = rng.random(40)
    pos = np.concatenate([np.arange((grp == g).sum()) for g in range(5)])
    got = gen._decayed_prior(pos, tt, tt, w, 1e-4)
    want = [sum(w[j] * np.exp(-1e-4 * (tt[i] - tt[j])) for j in range(40) if grp[j] == grp[i] and j < i)
            for i in range(40)]
    assert np.allclose(got, want)
