"""Synthetic landing data: a small live-commerce world, simulated one day at a time.

Why a simulated world and not random rows: every later stage needs data whose structure
is known. Cleaning needs faults whose exact counts are known (the ledger), features need
histories that carry over from day to day, and the attention model needs signals that a
model *can* learn, so that its metrics beat the baselines for a reason:

- taste: each viewer has latent category and brand affinities and a latent factor that
  meets a product factor; clicks, carts and purchases rise with them, and dwell is longer
  on products the viewer likes;
- purchase power: each viewer has a price tier (1..5, a per-item budget); the funnel falls
  with ``log(live_price / budget)`` when the price is above the budget, and rises with the
  live discount;
- time decay: earlier views, clicks and carts in the same category raise the next click,
  cart and purchase with weight ``exp(-lambda_type * dt)`` (views fade in about an hour,
  clicks in hours, carts in about a day; clicks and carts carry over to later days);
- sequences: buying a trigger product (a phone, a laptop, a camera, ...) raises clicks and
  purchases of its complements (cases, chargers, bags, memory cards, ...) for days after;
- hosts and time: viewers have favourite hosts and active hours (by time zone), hosts have
  category specialties, streams peak in the evening of UTC+8;
- cold start: about 1 % new products launch every day (hosts promote them) and new viewers
  join every day.

The world is anchored at the first date generated into a landing root (``epoch`` in the
ledger). Everything of date D is a function of (seed, scale, epoch, D) and of the carried
state of D-1 (decayed engagement, late arrivals, a replay pool), which is saved under
``_ledger/state/``; so generating days one call at a time or all at once gives the same
bytes, and the schedule written as "the day after the last day" is the schedule that day
will have when it is generated. Generation is vectorised with numpy (per session, per
slot-view, per event arrays); JSON lines are assembled as byte matrices, no per-event
Python loop.

Layout under the landing root: ``events/date=D/part-0000{0..3}.jsonl[.gz]`` (1 and 3 are
gzip; a session's events all land in one file, each file in time order),
``catalog/products_D.csv`` (products launched up to D), ``schedule/streams_D.csv`` and
``schedule/stream_products_D.csv`` for every generated day and the day after the last (a
stream of D shows products launched before D, so D's catalog covers D+1's schedule), and
``_ledger/ledger.json``: ``{seed, scale, epoch, dates: {D: {files, lines, empty_files,
late_events, valid_events, faults}}}`` with ``lines == valid_events + sum(faults except
empty_files)``. Ids: viewer "v" + 7 digits, product "p" + 7, host "h" + 4, stream "st" +
YYYYMMDD + 4, session "se" + 16 hex, event "e" + 16 hex (unique across days), device "d" +
12 hex. CSV timestamps are UTC with "Z"; event_ts carries the viewer's offset (+08:00,
+00:00, -05:00, +05:30, +09:00).

Event conventions: ``product_id`` is null for enter_stream/leave_stream and carries the
product of the slot on air for like/comment/share/gift; ``dwell_ms`` is the time on the
product for view_product, the session length for leave_stream, 0 otherwise (never null);
``price_paid`` is the TOTAL paid (live_price * quantity), only on purchase; ``quantity``
(1..3) only on add_to_cart and purchase (a purchase has the quantity of its cart);
``comment_text`` only on comment (raw UTF-8, may contain emoji and escaped newlines).

Faults (``faults=True``), each faulty line carries exactly one fault and is taken from an
otherwise valid, non-late, non-bot event (so the ledger counts are exact):

- malformed_json: the line is cut before an ASCII byte (no closing brace; still UTF-8);
- non_utf8: a comment line whose comment_text gets the raw bytes ``\\xff\\xfe`` appended
  (valid JSON when decoded with replacement);
- wrong_type: ``dwell_ms`` (any event), ``quantity`` (cart/purchase) or ``price_paid``
  (purchase) becomes a non-numeric string such as "abc";
- missing_required: one of event_id, viewer_id, event_type, event_ts is removed;
- unknown_event_type: event_type becomes e.g. "heartbeat";
- bad_dwell: dwell_ms is negative or above 24 h;
- future_ts / past_ts: event_ts moves 2..30 days later / 61..400 days earlier (same offset);
- unknown_product: product_id (on view/click/cart/purchase) becomes "p9" + 6 digits, never
  in any catalog;
- unknown_stream: stream_id gets a 5-digit index, never in any schedule;
- dup_within_file: an exact copy of a valid line elsewhere in the same file;
- dup_replay: an exact copy of a valid line of an earlier file of the same day, or of the
  previous day's files (when that day is in the ledger), placed in a later/other file;
- bot_events: a few bot accounts (inactive viewers of the day) emit 130..260 well-formed
  events within 100 s inside one slot (every bot event counts);
- empty_files: 1..2 zero-byte ``.jsonl`` files in the day folder (a count of files, in
  the entry's ``empty_files`` and in ``faults``; not lines).

Late arrivals (~0.5 %, weighted to the last hours of D-1) are events of D-1 that land in
D's folder; they are valid events, counted in ``valid_events`` and in ``late_events``.
The first day of a world has none. Normal viewers never exceed 8 events in any 60 s window
nor 4 purchases in any hour; bots always exceed 30 events in one minute.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from streamrank.errors import UsageError

__all__ = ["generate", "EVENT_TYPES", "FAULT_KINDS", "CATEGORIES"]

log = logging.getLogger(__name__)

EVENT_TYPES: tuple[str, ...] = (
    "enter_stream", "leave_stream", "view_product", "like", "comment", "share", "gift",
    "click_product", "add_to_cart", "purchase",
)
ENTER, LEAVE, VIEW, LIKE, COMMENT, SHARE, GIFT, CLICK, CART, BUY = range(10)
_SOCIAL = (LIKE, COMMENT, SHARE, GIFT)

#: Line-fault kinds (one per faulty line) plus the two counted kinds, in ledger order.
LINE_FAULTS: tuple[str, ...] = (
    "malformed_json", "non_utf8", "wrong_type", "missing_required", "unknown_event_type",
    "bad_dwell", "future_ts", "past_ts", "unknown_product", "unknown_stream",
)
FAULT_KINDS: tuple[str, ...] = LINE_FAULTS[:8] + (
    "dup_within_file", "dup_replay", "unknown_product", "unknown_stream", "bot_events",
)

#: category -> (median list price, singular label for titles); dict order = category index
CATEGORIES: dict[str, tuple[float, str]] = {
    "phones": (349.0, "Smartphone"), "phone_cases": (15.0, "Phone Case"),
    "chargers": (22.0, "Fast Charger"), "screen_protectors": (9.0, "Screen Protector"),
    "headphones": (59.0, "Headphones"), "smartwatches": (149.0, "Smartwatch"),
    "laptops": (799.0, "Laptop"), "laptop_bags": (35.0, "Laptop Bag"),
    "computer_mice": (24.0, "Wireless Mouse"), "cameras": (499.0, "Camera"),
    "memory_cards": (18.0, "Memory Card"), "tripods": (29.0, "Tripod"),
    "gaming_consoles": (399.0, "Game Console"), "video_games": (49.0, "Video Game"),
    "coffee_machines": (199.0, "Coffee Machine"), "coffee_beans": (14.0, "Coffee Beans"),
    "skincare": (28.0, "Serum"), "makeup": (18.0, "Lipstick"),
    "makeup_brushes": (12.0, "Brush Set"), "fragrance": (55.0, "Eau de Parfum"),
    "haircare": (15.0, "Shampoo"), "snacks": (6.0, "Snack Box"), "beverages": (5.0, "Tea"),
    "kitchenware": (25.0, "Pan"), "home_decor": (30.0, "Lamp"), "toys": (20.0, "Toy Set"),
    "womens_fashion": (35.0, "Dress"), "mens_fashion": (35.0, "Shirt"),
    "shoes": (59.0, "Sneakers"), "sports_gear": (40.0, "Yoga Mat"),
}
_CAT_NAMES = list(CATEGORIES)
_NC = len(_CAT_NAMES)
#: how much of the platform's attention each category gets (beauty, fashion, phones lead)
_CAT_WEIGHT = np.array([6, 4, 3, 2, 4, 3, 2, 1, 1.5, 1.5, 1, 1, 1.5, 2, 1.5, 1.5, 7, 7, 2, 3,
                        3, 6, 3, 3, 2.5, 3, 7, 4, 4, 2.5], dtype=float)
#: buying a trigger raises its complements for days (the sequential pattern to learn)
TRIGGERS: dict[str, tuple[str, ...]] = {
    "phones": ("phone_cases", "chargers", "screen_protectors"),
    "laptops": ("laptop_bags", "computer_mice"),
    "cameras": ("memory_cards", "tripods"),
    "gaming_consoles": ("video_games",),
    "coffee_machines": ("coffee_beans",),
    "makeup": ("makeup_brushes",),
}
_TRIG_NAMES = list(TRIGGERS)
_NT = len(_TRIG_NAMES)
_COMP_TRIGGER = np.full(_NC, -1, np.int64)  # category index -> trigger index (or -1)
for _ti, _t in enumerate(_TRIG_NAMES):
    for _c in TRIGGERS[_t]:
        _COMP_TRIGGER[_CAT_NAMES.index(_c)] = _ti
_IS_TRIGGER = np.array([c in TRIGGERS for c in _CAT_NAMES])
_TRIGGER_OF_CAT = np.array([_TRIG_NAMES.index(c) if c in TRIGGERS else -1 for c in _CAT_NAMES])

_TZ_MINUTES = np.array([480, 0, -300, 330, 540], np.int64)
_TZ_TEXT = [b"+08:00", b"+00:00", b"-05:00", b"+05:30", b"+09:00"]
_TZ_P = np.array([0.62, 0.12, 0.12, 0.07, 0.07])
_TIER_BUDGET = np.array([0.0, 15.0, 40.0, 100.0, 300.0, 900.0])  # index = tier 1..5
_APP_VERSIONS = ["5.2.0", "5.2.1", "5.3.0", "5.3.1", "6.0.0", "6.0.2"]
_APP_P = np.array([0.05, 0.10, 0.15, 0.25, 0.30, 0.15])
_COMMENTS = [
    "how much is shipping?", "is this available in blue?", "😍 love it", "好看!",
    "多少钱?", "just ordered 2", "does it come with a warranty?", "size \"M\" fits?",
    "great price!\nordered one", "link please", "🔥🔥🔥", "what's the battery life?",
    "can you show the back?", "hi from Jakarta", "is the discount still on?",
    "my sister has this, it's great", "too expensive :(", "which colour is best?",
    "restock when?", "C'est magnifique", "wow", "10/10 would buy again",
]
_BRAND_SYLL = ["no", "va", "tek", "lu", "mio", "zen", "ko", "ra", "shi", "mi", "bel", "ora",
               "vi", "ta", "pix", "el", "qu", "ix", "sol", "ar", "me", "lo", "ne", "xa"]

# random-stream tags (SeedSequence entropy) so every purpose has its own stream
_T_BRAND, _T_PROD, _T_HOST, _T_VIEW, _T_SCHED, _T_DAY, _T_FAULT, _T_BOT, _T_WORLD = range(1, 10)

# decay rates per second (half-lives: view 45 min, click 6 h, cart 1 day, trigger 3 days)
_LAM_VIEW = np.log(2) / 2700.0
_LAM_CLICK = np.log(2) / (6 * 3600.0)
_LAM_CART = np.log(2) / 86400.0
_LAM_TRIG = np.log(2) / (3 * 86400.0)

_DAY_MS = 86_400_000
_BIG = 1_000_000_000  # key stride: > one day in ms plus margins
_EVENTS_PER_SESSION = 7.5  # calibrated: scale 1 gives ~1M events per day
_SESSIONS_SCALE_1 = 1_000_000 / _EVENTS_PER_SESSION
_MAX_EVENTS_PER_MIN = 8  # normal viewers; the cleaning bot rule is > 30 / minute
_MAX_BUYS_PER_HOUR = 4  # normal viewers; the cleaning bot rule is > 20 / hour
_SESSION_GAP_MS = 90_000
_MIN_VIEW_WINDOW_MS = 60_000
_LATE_SHARE = 0.005
_BOT_SHARE = 0.003
_FILES_PER_DAY = 4
_GZ_FILES = (1, 3)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    """One independent, reproducible random stream per (seed, purpose, key)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, tags)]))


def _mix64(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64, so distinct inputs give distinct ids."""
    z = x.astype(np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


# ----------------------------------------------------------------------------------------
# byte-matrix formatting: every field is an (n, width) uint8 matrix plus a length per row
# ----------------------------------------------------------------------------------------
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_P10 = 10 ** np.arange(19, dtype=np.int64)
_AR = np.arange(512)


def _fixed_digits(x: np.ndarray, width: int) -> np.ndarray:
    """Zero-padded decimal digits (n, width) of non-negative ints."""
    x = np.asarray(x, np.int64)
    p = _P10[width - 1::-1][:width]
    return ((x[:, None] // p[None, :]) % 10 + 48).astype(np.uint8)


def _var_digits(x: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned decimal digits of non-negative ints and their lengths."""
    x = np.asarray(x, np.int64)
    ln = np.ones(len(x), np.int64)
    for k in range(1, width):
        ln += x >= _P10[k]
    e = ln[:, None] - 1 - np.arange(width)[None, :]
    d = (x[:, None] // _P10[np.clip(e, 0, 18)]) % 10 + 48
    return d.astype(np.uint8), ln


def _hex(x: np.ndarray, nibbles: int) -> np.ndarray:
    """Lower-case hex (n, nibbles) of the low bits of uint64 values."""
    sh = np.arange(nibbles - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    return _HEX[((x.astype(np.uint64)[:, None] >> sh[None, :]) & np.uint64(15)).astype(np.int64)]


def _table(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """A lookup table of byte strings as a padded matrix plus lengths."""
    w = max(len(s) for s in strings)
    m = np.zeros((len(strings), w), np.uint8)
    for i, s in enumerate(strings):
        m[i, : len(s)] = np.frombuffer(s, np.uint8)
    return m, np.array([len(s) for s in strings], np.int64)


def _compact(segs: list, m: int) -> tuple[bytes, np.ndarray]:
    """Concatenate row-wise segments (bytes constants or (matrix, lengths|None)) into lines.

    The rows are laid side by side in one (m, W) matrix with a mask of the bytes that
    exist; ``big[mask]`` is then all lines back to back, in row order."""
    merged: list = []
    for s in segs:
        if isinstance(s, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += s
        else:
            merged.append(s)
    width = sum(len(s) if isinstance(s, bytes) else s[0].shape[1] for s in merged)
    big = np.empty((m, width), np.uint8)
    mask = np.ones((m, width), bool)
    lens = np.zeros(m, np.int64)
    o = 0
    for s in merged:
        if isinstance(s, bytes):
            w = len(s)
            big[:, o:o + w] = np.frombuffer(s, np.uint8)
            lens += w
        else:
            mat, ln = s
            w = mat.shape[1]
            big[:, o:o + w] = mat
            if ln is None:
                lens += w
            else:
                mask[:, o:o + w] = _AR[:w][None, :] < ln[:, None]
                lens += ln
        o += w
    return big[mask].tobytes(), lens


# ----------------------------------------------------------------------------------------
# the world: brands, products, hosts, viewers (grown day by day from the epoch)
# ----------------------------------------------------------------------------------------
@dataclass
class _Sizes:
    """Population sizes for a scale (floors keep tiny scales meaningful)."""

    products0: int
    launches_per_day: int
    brands: int
    hosts: int
    streams: int
    viewers0: int
    new_viewers_per_day: int
    sessions: int

    @classmethod
    def of(cls, scale: float) -> _Sizes:
        p0 = max(200, round(5000 * scale))
        v0 = max(800, round(250_000 * scale))
        return cls(
            products0=p0, launches_per_day=max(2, round(0.01 * p0)),
            brands=int(np.clip(round(200 * scale ** 0.5), 30, 200)),
            hosts=max(3, round(50 * scale)), streams=max(4, round(200 * scale)),
            viewers0=v0, new_viewers_per_day=max(8, round(0.015 * v0)),
            sessions=max(60, round(_SESSIONS_SCALE_1 * scale)),
        )


@dataclass
class _Schedule:
    """Streams and product slots of one date (times in ms since that date's UTC midnight)."""

    date: dt.date
    host: np.ndarray
    start: np.ndarray
    end: np.ndarray
    slot_stream: np.ndarray
    slot_product: np.ndarray
    slot_start: np.ndarray
    slot_end: np.ndarray
    slot_live_cents: np.ndarray


class _World:
    """Everything fixed about the synthetic platform, generated lazily up to a date."""

    def __init__(self, seed: int, scale: float, epoch: dt.date) -> None:
        self.seed, self.scale, self.epoch = seed, scale, epoch
        self.sz = _Sizes.of(scale)
        r = _rng(seed, _T_WORLD)
        w = _CAT_WEIGHT * r.lognormal(0, 0.25, _NC)
        self.cat_pop = w / w.sum()
        self._make_brands()
        self._make_hosts()
        self.p_cat = np.zeros(0, np.int64)
        self.p_brand = np.zeros(0, np.int64)
        self.p_cents = np.zeros(0, np.int64)
        self.p_launch = np.zeros(0, np.int64)
        self.p_pop = np.zeros(0)
        self.p_q = np.zeros((0, 8), np.float32)
        self.p_model = np.zeros(0, np.int64)
        self._p_chunks = 0
        self.v = {k: np.zeros((0,) + s, d) for k, (s, d) in {
            "pref": ((_NC,), np.float32), "u": ((8,), np.float32), "tier": ((), np.int64),
            "tz": ((), np.int64), "hour": ((), np.float64), "act": ((), np.float64),
            "eng": ((), np.float64), "fav_hosts": ((2,), np.int64),
            "fav_brands": ((3,), np.int64), "join": ((), np.int64), "app": ((), np.int64),
            "ip": ((4,), np.int64),
        }.items()}
        self._v_chunks = 0

    # -- brands and hosts ----------------------------------------------------------------
    def _make_brands(self) -> None:
        r = _rng(self.seed, _T_BRAND)
        n = self.sz.brands
        cat = np.concatenate([np.arange(_NC), r.choice(_NC, n - _NC, p=self.cat_pop)])
        self.b_cat = np.sort(cat)
        self.b_pop = r.lognormal(0, 1.0, n)
        names, seen = [], set()
        for i in range(n):
            k = r.integers(2, 4)
            s = "".join(r.choice(_BRAND_SYLL, k)).capitalize()
            if s in seen:
                s = f"{s}{i}"
            seen.add(s)
            names.append(s)
        self.b_name = names
        # brands of each category with cumulative popularity (to sample a brand per product)
        self.b_off = np.searchsorted(self.b_cat, np.arange(_NC + 1))

    def _make_hosts(self) -> None:
        r = _rng(self.seed, _T_HOST)
        n = self.sz.hosts
        self.h_pop = r.lognormal(0, 0.8, n)
        spec = np.full((n, _NC), 0.15 / _NC)
        for h in range(n):
            k = r.integers(1, 4)
            cats = r.choice(_NC, k, replace=False, p=self.cat_pop)
            wts = 0.85 * r.dirichlet(np.full(k, 2.0))
            for c, wc in zip(cats, wts, strict=True):
                comps = TRIGGERS.get(_CAT_NAMES[c], ())
                if comps:  # a phone host also sells cases and chargers: sequences in-stream
                    spec[h, c] += 0.6 * wc
                    spec[h, [_CAT_NAMES.index(x) for x in comps]] += 0.4 * wc / len(comps)
                else:
                    spec[h, c] += wc
        self.h_spec = spec

    # -- products --------------------------------------------------------------------------
    def _product_chunk(self, k: int) -> None:
        """Chunk 0 is the catalog before the epoch; chunk k >= 1 is the launches of epoch+k-1."""
        r = _rng(self.seed, _T_PROD, k)
        n0 = self.sz.products0
        n = n0 if k == 0 else self.sz.launches_per_day
        cat = r.choice(_NC, n, p=self.cat_pop)
        u = r.random(n)
        lo, hi = self.b_off[cat], self.b_off[cat + 1]
        # brand within category by popularity (inverse CDF on the category's brands)
        brand = np.empty(n, np.int64)
        for c in np.unique(cat):
            sel = cat == c
            w = self.b_pop[lo[sel][0]:hi[sel][0]]
            cw = np.cumsum(w) / w.sum()
            brand[sel] = lo[sel][0] + np.minimum(np.searchsorted(cw, u[sel]), len(w) - 1)
        med = np.array([CATEGORIES[c][0] for c in _CAT_NAMES])[cat]
        price = med * np.exp(0.45 * r.standard_normal(n))
        cents = np.where(price >= 10, np.floor(price) * 100 + 99, np.round(price * 100))
        cents = np.maximum(cents, 99).astype(np.int64)
        rank = r.permutation(n) + 1 if k == 0 else r.integers(1, n0 + 1, n)
        pop = 1.0 / (rank + 5.0) ** 0.9
        if k == 0:
            launch = self.epoch.toordinal() - r.integers(1, 731, n)
        else:
            launch = np.full(n, self.epoch.toordinal() + k - 1)
        self.p_cat = np.concatenate([self.p_cat, cat])
        self.p_brand = np.concatenate([self.p_brand, brand])
        self.p_cents = np.concatenate([self.p_cents, cents])
        self.p_launch = np.concatenate([self.p_launch, launch])
        self.p_pop = np.concatenate([self.p_pop, pop])
        self.p_q = np.concatenate([self.p_q, (r.standard_normal((n, 8)) / 8 ** 0.5).astype(np.float32)])
        self.p_model = np.concatenate([self.p_model, r.integers(1, 100, n)])
        self._p_chunks += 1

    def ensure_products(self, d: dt.date) -> int:
        """Generate products launched up to date d; return how many exist."""
        need = 1 + max(0, d.toordinal() - self.epoch.toordinal() + 1)
        while self._p_chunks < need:
            self._product_chunk(self._p_chunks)
        return len(self.p_cat)

    def n_products(self, d: dt.date) -> int:
        """Products launched on or before d (ids are in launch order)."""
        return self.sz.products0 + self.sz.launches_per_day * max(0, d.toordinal() - self.epoch.toordinal() + 1)

    def catalog(self, d: dt.date) -> pd.DataFrame:
        """The catalog file of date d: every product launched up to d."""
        self.ensure_products(d)
        n = self.n_products(d)
        idx = np.arange(n)
        labels = np.array([CATEGORIES[c][1] for c in _CAT_NAMES], dtype=object)
        series = np.array(list("SXAMPZ"), dtype=object)[self.p_model[:n] % 6]
        brand = np.array(self.b_name, dtype=object)[self.p_brand[:n]]
        title = brand + " " + labels[self.p_cat[:n]] + " " + series + self.p_model[:n].astype(str).astype(object)
        cents = self.p_cents[:n]
        return pd.DataFrame({
            "product_id": [f"p{i:07d}" for i in idx],
            "title": title,
            "category": np.array(_CAT_NAMES, dtype=object)[self.p_cat[:n]],
            "brand": brand,
            "list_price": [f"{c // 100}.{c % 100:02d}" for c in cents],
            "launch_date": [dt.date.fromordinal(int(o)).isoformat() for o in self.p_launch[:n]],
        })

    # -- viewers ---------------------------------------------------------------------------
    def _viewer_chunk(self, k: int) -> None:
        """Chunk 0: viewers before the epoch; chunk k >= 1: viewers who join on epoch+k-1."""
        r = _rng(self.seed, _T_VIEW, k)
        n = self.sz.viewers0 if k == 0 else self.sz.new_viewers_per_day
        tz = r.choice(len(_TZ_MINUTES), n, p=_TZ_P)
        local = (r.normal(20.5, 2.2, n)) % 24
        hour = (local - _TZ_MINUTES[tz] / 60.0) % 24
        pref = 0.8 * r.dirichlet(np.full(_NC, 0.3), n) + 0.2 * self.cat_pop[None, :]
        u = (r.standard_normal((n, 8)) / 8 ** 0.5).astype(np.float32)
        tier = r.choice(5, n, p=[0.25, 0.30, 0.25, 0.13, 0.07]) + 1
        act = r.lognormal(0, 0.7, n)
        eng = r.lognormal(0, 0.5, n)
        # favourite hosts: popular hosts whose specialty matches the viewer's taste
        score = np.log(self.h_pop)[None, :] + np.log(0.2 + _NC * pref @ self.h_spec.T)
        score = score + r.gumbel(size=score.shape)
        nh = score.shape[1]
        fav_h = np.argsort(-score, axis=1)[:, :2] if nh >= 2 else np.zeros((n, 2), np.int64)
        # favourite brands: a liked category, then a popular brand of it
        cum = np.cumsum(pref, axis=1)
        cats = (cum[:, None, :] < r.random((n, 3, 1)) * cum[:, -1:, None]).sum(2)
        cats = np.minimum(cats, _NC - 1)
        ub = r.random((n, 3))
        fav_b = np.empty((n, 3), np.int64)
        for c in range(_NC):
            sel = cats == c
            if sel.any():
                w = self.b_pop[self.b_off[c]:self.b_off[c + 1]]
                cw = np.cumsum(w) / w.sum()
                fav_b[sel] = self.b_off[c] + np.minimum(np.searchsorted(cw, ub[sel]), len(w) - 1)
        first = np.array([[36, 58, 101, 113, 183], [81, 86, 92, 151, 176], [24, 73, 98, 108, 174],
                          [49, 103, 117, 122, 157], [60, 110, 126, 133, 153]])
        ip = np.stack([first[tz, r.integers(0, 5, n)], r.integers(0, 256, n),
                       r.integers(0, 256, n), r.integers(1, 255, n)], 1)
        if k == 0:
            join = self.epoch.toordinal() - r.integers(1, 900, n)
        else:
            join = np.full(n, self.epoch.toordinal() + k - 1)
        new = {"pref": pref.astype(np.float32), "u": u, "tier": tier, "tz": tz, "hour": hour,
               "act": act, "eng": eng, "fav_hosts": fav_h.astype(np.int64), "fav_brands": fav_b,
               "join": join.astype(np.int64), "app": r.choice(len(_APP_VERSIONS), n, p=_APP_P),
               "ip": ip.astype(np.int64)}
        for key, val in new.items():
            self.v[key] = np.concatenate([self.v[key], val])
        self._v_chunks += 1

    def n_viewers(self, d: dt.date) -> int:
        """Viewers who exist on date d (ids in join order)."""
        return self.sz.viewers0 + self.sz.new_viewers_per_day * max(0, d.toordinal() - self.epoch.toordinal() + 1)

    def ensure_viewers(self, d: dt.date) -> int:
        """Generate viewers who joined up to date d; return how many exist."""
        need = 1 + max(0, d.toordinal() - self.epoch.toordinal() + 1)
        while self._v_chunks < need:
            self._viewer_chunk(self._v_chunks)
        return self.n_viewers(d)

    # -- schedule --------------------------------------------------------------------------
    def schedule(self, d: dt.date) -> _Schedule:
        """Streams of date d. Only products launched before d are shown, so the day-after
        schedule written with day D references products of D's catalog."""
        r = _rng(self.seed, _T_SCHED, d.toordinal())
        self.ensure_products(d)
        n_s, n_h = self.sz.streams, self.sz.hosts
        cap = max(2, int(np.ceil(n_s / n_h)) + 2)
        cap = min(cap, 6)
        hp = self.h_pop ** 0.7
        counts = np.zeros(n_h, np.int64)
        host = np.empty(n_s, np.int64)
        for i in range(n_s):  # one host per stream, a few streams per host at most
            w = np.where(counts < cap, hp, 0.0)
            host[i] = r.choice(n_h, p=w / w.sum())
            counts[host[i]] += 1
        slot_secs = []
        for _ in range(n_s):  # 8..15 slots of 5..20 min, 1..3 h in all
            while True:
                k = int(r.integers(8, 16))
                s = r.integers(300, 1201, k)
                if 3600 <= s.sum() <= 10800:
                    break
            slot_secs.append(s)
        dur = np.array([s.sum() for s in slot_secs], np.int64)
        gap, day_end = 900, 86400 - 60  # streams end by 23:59 UTC: all events stay on the day
        peak = r.random(n_s) < 0.75
        start = np.where(peak, r.normal(12.0 * 3600, 2.5 * 3600, n_s), r.uniform(0, 86400, n_s))
        start = np.clip(start - dur / 2, 0, day_end - dur).astype(np.int64)
        for h in np.unique(host):  # a host never runs two streams at once
            idx = np.where(host == h)[0]
            idx = idx[np.argsort(start[idx], kind="stable")]
            t = 0
            for i in idx:
                start[i] = max(start[i], t)
                t = start[i] + dur[i] + gap
            over = start[idx[-1]] + dur[idx[-1]] - day_end
            if over > 0:
                t = day_end
                for i in idx[::-1]:
                    start[i] = min(start[i], t - dur[i])
                    t = start[i] - gap
        order = np.lexsort((host, start))
        host, start, dur = host[order], start[order], dur[order]
        slot_secs = [slot_secs[i] for i in order]
        avail = self.n_products(d - dt.timedelta(days=1))
        new_boost = 1.0 + 2.0 * (self.p_launch[:avail] >= d.toordinal() - 7)
        sp, ss, se, sl, sst = [], [], [], [], []
        for i in range(n_s):
            k = len(slot_secs[i])
            w = self.p_pop[:avail] * (self.h_spec[host[i], self.p_cat[:avail]] + 0.01) * new_boost
            prods = r.choice(avail, k, replace=False, p=w / w.sum())
            disc = r.uniform(0.0, 0.4, k)
            live = np.maximum(1, np.round(self.p_cents[prods] * (1 - disc))).astype(np.int64)
            edges = start[i] + np.concatenate([[0], np.cumsum(slot_secs[i])])
            sp.append(prods)
            ss.append(edges[:-1])
            se.append(edges[1:])
            sl.append(live)
            sst.append(np.full(k, i))
        return _Schedule(
            date=d, host=host, start=start * 1000, end=(start + dur) * 1000,
            slot_stream=np.concatenate(sst), slot_product=np.concatenate(sp),
            slot_start=np.concatenate(ss) * 1000, slot_end=np.concatenate(se) * 1000,
            slot_live_cents=np.concatenate(sl),
        )


# ----------------------------------------------------------------------------------------
# carried state
# ----------------------------------------------------------------------------------------
@dataclass
class _State:
    """What day D+1 needs from day D: decayed engagement (value at D+1 00:00 UTC),
    late arrivals and a pool of valid lines to replay."""

    click_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    click_v: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cart_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cart_v: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trig_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    trig_v: np.ndarray = field(default_factory=lambda: np.zeros(0))
    late_lines: list[bytes] = field(default_factory=list)
    late_viewers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pool_lines: list[bytes] = field(default_factory=list)

    _ARRAYS = ("click_k", "click_v", "cart_k", "cart_v", "trig_k", "trig_v", "late_viewers")

    def save(self, folder: Path) -> None:
        """Write atomically (temp folder, then rename); np.save is byte-deterministic."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k in self._ARRAYS:
            np.save(tmp / f"{k}.npy", getattr(self, k))
        (tmp / "late.jsonl").write_bytes(b"".join(self.late_lines))
        (tmp / "pool.jsonl").write_bytes(b"".join(self.pool_lines))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path) -> _State:
        """Read what ``save`` wrote."""
        s = cls(**{k: np.load(folder / f"{k}.npy") for k in cls._ARRAYS})
        s.late_lines = (folder / "late.jsonl").read_bytes().splitlines(keepends=True)
        s.pool_lines = (folder / "pool.jsonl").read_bytes().splitlines(keepends=True)
        return s


def _lookup(keys: np.ndarray, vals: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Values of sorted keys at q (0 where absent)."""
    if len(keys) == 0:
        return np.zeros(len(q))
    i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return np.where(keys[i] == q, vals[i], 0.0)


def _carry(keys: np.ndarray, vals: np.ndarray, new_k: np.ndarray, new_t_s: np.ndarray,
           lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Decay yesterday's accumulators over one day and add today's events, valued at the
    next midnight; tiny values are pruned so the state stays small."""
    allk = np.concatenate([keys, new_k])
    allv = np.concatenate([vals * np.exp(-lam * 86400.0), np.exp(-lam * (86400.0 - new_t_s))])
    uk, inv = np.unique(allk, return_inverse=True)
    uv = np.bincount(inv, weights=allv, minlength=len(uk))
    keep = uv > 1e-3
    return uk[keep], uv[keep]


def _decayed_prior(pos: np.ndarray, q_t: np.ndarray, src_t: np.ndarray, src_w: np.ndarray,
                   lam: float, max_lag: int = 200) -> np.ndarray:
    """sum_j<i (same group) w_j * exp(-lam (t_i - t_j)) for rows sorted by (group, time).

    Loops over the lag, not over rows: each pass is vectorised over the rows that have at
    least that many predecessors in their group, so the work is sum(group sizes^2)/2."""
    out = np.zeros(len(q_t))
    idx = np.nonzero(pos >= 1)[0]
    k = 1
    while len(idx) and k <= max_lag:
        j = idx - k
        w = src_w[j]
        nz = w != 0
        if nz.any():
            ii, jj = idx[nz], j[nz]
            out[ii] += w[nz] * np.exp(-lam * (q_t[ii] - src_t[jj]))
        k += 1
        idx = idx[pos[idx] >= k]
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logit -> probability for the funnel layers."""
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------
# one day of behaviour
# ----------------------------------------------------------------------------------------
@dataclass
class _Day:
    """The valid events of one date (own events, sorted by time) and their context."""

    date: dt.date
    sched: _Schedule
    ev: dict[str, np.ndarray]
    late_mask: np.ndarray  # events that arrive late (in the next day's folder)
    active_viewers: np.ndarray


def _simulate(world: _World, d: dt.date, sched: _Schedule, state: _State) -> tuple[_Day, _State]:
    """Simulate viewers' sessions on date d; return the day and the state for d+1."""
    r = _rng(world.seed, _T_DAY, d.toordinal())
    nv = world.ensure_viewers(d)
    V = {k: a[:nv] for k, a in world.v.items()}

    # -- sessions: who comes, to which stream, when -------------------------------------
    act = V["act"] * np.where(V["join"] == d.toordinal(), 2.0, 1.0)
    lam = act * (world.sz.sessions / act.sum())
    counts = r.poisson(lam)
    sv = np.repeat(np.arange(nv), counts)
    ns = len(sv)
    s_mid_h = (sched.start + sched.end) / 2 / 3.6e6
    s_spec = world.h_spec[sched.host]
    s_base = 0.8 * np.log(world.h_pop[sched.host]) + np.log((sched.end - sched.start) / 3.6e6)
    # after buying a trigger, viewers seek streams that sell its complements
    comp_mass = np.stack([s_spec[:, [_CAT_NAMES.index(c) for c in TRIGGERS[t]]].sum(1) for t in _TRIG_NAMES])
    trig_now = np.zeros((nv, _NT))
    if len(state.trig_k):
        trig_now[state.trig_k // _NT, state.trig_k % _NT] = state.trig_v
    stream = np.empty(ns, np.int64)
    for a in range(0, ns, 16384):
        v = sv[a:a + 16384]
        sc = np.log(0.3 + _NC * (V["pref"][v] @ s_spec.T))
        sc += s_base[None, :]
        fav = (V["fav_hosts"][v][:, :, None] == sched.host[None, None, :]).any(1)
        sc += 1.5 * fav
        sc += 3.0 * (trig_now[v] @ comp_mass)
        dh = np.abs(V["hour"][v][:, None] - s_mid_h[None, :])
        dh = np.minimum(dh, 24 - dh)
        sc -= 0.5 * (dh / 3.0) ** 2
        sc += r.gumbel(size=sc.shape)
        stream[a:a + 16384] = np.argmax(sc, axis=1)
    st, en = sched.start[stream], sched.end[stream]
    t0 = st + (r.random(ns) * (en - st - 60_000)).astype(np.int64)
    dur = np.exp(np.log(540_000) + 0.9 * r.standard_normal(ns)).astype(np.int64)
    t1 = t0 + np.clip(dur, 30_000, None)
    t1 = np.minimum(t1, en)
    # a viewer never watches two streams at once: drop sessions that start before any
    # earlier session of the same viewer ended (plus a gap), conservatively
    o = np.lexsort((t0, sv))
    sv, stream, t0, t1 = sv[o], stream[o], t0[o], t1[o]
    kend = np.maximum.accumulate(sv * _BIG + t1)
    prev = np.concatenate([[-(10 ** 15)], kend[:-1]])
    keep = sv * _BIG + t0 > prev + _SESSION_GAP_MS
    sv, stream, t0, t1 = sv[keep], stream[keep], t0[keep], t1[keep]
    ns = len(sv)

    # -- slot views: one per (session, slot) with at least a minute on screen -----------
    key_end = sched.slot_stream * _BIG + sched.slot_end
    key_start = sched.slot_stream * _BIG + sched.slot_start
    first = np.searchsorted(key_end, stream * _BIG + t0, "right")
    last = np.searchsorted(key_start, stream * _BIG + t1, "left") - 1
    cnt = np.maximum(last - first + 1, 0)
    p_sess = np.repeat(np.arange(ns), cnt)
    p_slot = first[p_sess] + np.arange(len(p_sess)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ws = np.maximum(t0[p_sess], sched.slot_start[p_slot])
    we = np.minimum(t1[p_sess], sched.slot_end[p_slot])
    ok = we - ws >= _MIN_VIEW_WINDOW_MS
    p_sess, p_slot, ws, we = p_sess[ok], p_slot[ok], ws[ok], we[ok]
    npairs = len(p_sess)
    pv = sv[p_sess]
    pp = sched.slot_product[p_slot]
    pc = world.p_cat[pp]
    live = sched.slot_live_cents[p_slot]
    disc = 1.0 - live / world.p_cents[pp]
    brand_match = (V["fav_brands"][pv] == world.p_brand[pp][:, None]).any(1)
    pop_z = np.log(world.p_pop[pp])
    pop_z = (pop_z + 5.0) / 1.5
    fav_host = (V["fav_hosts"][pv] == sched.host[stream[p_sess]][:, None]).any(1)
    z_aff = (np.log(_NC * V["pref"][pv, pc] + 0.1) + 0.9 * brand_match
             + 0.8 * np.einsum("ij,ij->i", V["u"][pv], world.p_q[pp]) + 0.35 * pop_z + 0.3 * fav_host)
    price_pen = -1.3 * np.maximum(0.0, np.log(live / 100.0 / _TIER_BUDGET[V["tier"][pv]]))
    delay = 1 + (r.random(npairs) * 4000).astype(np.int64)
    view_t = ws + delay
    room = we - view_t
    dwell = np.exp(np.log(25_000) + 0.35 * z_aff + 0.8 * r.standard_normal(npairs))
    dwell = np.clip(dwell, 800, room - 1).astype(np.int64)
    # funnel times are drawn for every pair up front, so re-running the funnel is consistent
    f = r.uniform(0.1, 0.6, (3, npairs))
    click_t = view_t + np.maximum(1, (f[0] * room).astype(np.int64))
    cart_t = click_t + np.maximum(1, (f[1] * (we - click_t)).astype(np.int64))
    buy_t = cart_t + np.maximum(1, (f[2] * (we - cart_t)).astype(np.int64))
    u3 = r.random((3, npairs))
    qty = r.choice(3, npairs, p=[0.75, 0.18, 0.07]) + 1

    # exposures per (viewer, category), rows sorted by (group, time)
    g = pv * _NC + pc
    o = np.lexsort((view_t, g))
    inv_o = np.empty_like(o)
    inv_o[o] = np.arange(npairs)
    gs = g[o]
    gstart = np.concatenate([[True], gs[1:] != gs[:-1]]) if npairs else np.zeros(0, bool)
    pos = np.arange(npairs) - np.maximum.accumulate(np.where(gstart, np.arange(npairs), 0))
    tq = view_t[o] / 1000.0
    e_view = _decayed_prior(pos, tq, tq, np.minimum(dwell[o] / 30_000.0, 3.0), _LAM_VIEW)[inv_o]
    ts_view = view_t / 1000.0
    pri_click = _lookup(state.click_k, state.click_v, g) * np.exp(-_LAM_CLICK * ts_view)
    pri_cart = _lookup(state.cart_k, state.cart_v, g) * np.exp(-_LAM_CART * ts_view)
    comp_t = _COMP_TRIGGER[pc]
    tkey = pv * _NT + comp_t
    pri_trig = np.where(comp_t >= 0, _lookup(state.trig_k, state.trig_v, tkey), 0.0) * np.exp(-_LAM_TRIG * ts_view)
    eng_l = np.log(V["eng"][pv])

    def funnel(e_trig: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layered click -> cart -> purchase; each layer only sees earlier layers, so the
        within-day exposures need no recursion."""
        lt = np.log1p(e_trig)
        zc = (-3.0 + z_aff + 0.5 * price_pen + 1.5 * disc + 0.45 * np.log(dwell / 25_000.0)
              + 0.8 * np.log1p(e_view) + 0.7 * np.log1p(pri_click) + 0.9 * np.log1p(pri_cart)
              + 1.2 * lt + 0.3 * eng_l)
        click = u3[0] < _sigmoid(zc)
        e_click = _decayed_prior(pos, tq, click_t[o] / 1000.0, click[o].astype(float), _LAM_CLICK)[inv_o] + pri_click
        zk = -1.2 + 0.6 * z_aff + price_pen + 1.0 * disc + 0.8 * np.log1p(e_click) + 0.9 * np.log1p(pri_cart) + 1.2 * lt
        cart = click & (u3[1] < _sigmoid(zk))
        e_cart = _decayed_prior(pos, tq, cart_t[o] / 1000.0, cart[o].astype(float), _LAM_CART)[inv_o] + pri_cart
        zb = (-0.6 + 0.5 * z_aff + 1.5 * price_pen + 1.0 * disc + 0.6 * np.log1p(e_click)
              + 1.0 * np.log1p(e_cart) + 1.5 * lt)
        buy = cart & (u3[2] < _sigmoid(zb))
        return click, cart, buy

    click, cart, buy = funnel(pri_trig)
    # within-day complements: trigger purchases (unchanged by complement boosts, as trigger
    # and complement categories are disjoint) boost later complement pairs; run again
    tb = buy & _IS_TRIGGER[pc]
    if tb.any():
        bk = pv[tb] * _NT + _TRIGGER_OF_CAT[pc[tb]]
        bt = buy_t[tb] / 1000.0
        ob = np.lexsort((bt, bk))
        bk, bt = bk[ob], bt[ob]
        cs = np.concatenate([[0.0], np.cumsum(np.exp(_LAM_TRIG * bt))])
        comb = bk * 1e6 + bt
        hi = np.searchsorted(comb, tkey * 1e6 + ts_view, "left")
        lo = np.searchsorted(bk, tkey, "left")
        within = np.where(comp_t >= 0, (cs[hi] - cs[lo]) * np.exp(-_LAM_TRIG * ts_view), 0.0)
        click, cart, buy = funnel(pri_trig + within)

    # -- social events and session boundaries ----------------------------------------------
    sdur_min = (t1 - t0) / 60_000.0
    eng_s = V["eng"][sv]
    rates = np.stack([0.20 * eng_s, 0.04 * eng_s, 0.015 * np.ones(ns),
                      0.008 * V["tier"][sv] / 3.0]) * sdur_min[None, :]
    soc_n = r.poisson(rates)
    soc_type = np.repeat(np.array(_SOCIAL), soc_n.sum(1))
    soc_sess = np.concatenate([np.repeat(np.arange(ns), soc_n[k]) for k in range(4)])
    soc_t = t0[soc_sess] + 1 + (r.random(len(soc_sess)) * (t1 - t0 - 1)[soc_sess]).astype(np.int64)
    soc_slot = np.searchsorted(key_start, stream[soc_sess] * _BIG + soc_t, "right") - 1
    comment_code = np.where(soc_type == COMMENT, r.integers(0, len(_COMMENTS), len(soc_type)), -1)

    # -- all events ----------------------------------------------------------------------------
    z = np.zeros
    parts = [  # (session, type, t, product, dwell, price cents, qty, comment, pair)
        (np.arange(ns), np.full(ns, ENTER), t0, np.full(ns, -1), z(ns, np.int64), None, None, None, None),
        (np.arange(ns), np.full(ns, LEAVE), t1, np.full(ns, -1), t1 - t0, None, None, None, None),
        (p_sess, np.full(npairs, VIEW), view_t, pp, dwell, None, None, None, np.arange(npairs)),
        (p_sess[click], np.full(click.sum(), CLICK), click_t[click], pp[click], None, None, None, None, np.nonzero(click)[0]),
        (p_sess[cart], np.full(cart.sum(), CART), cart_t[cart], pp[cart], None, None, qty[cart], None, np.nonzero(cart)[0]),
        (p_sess[buy], np.full(buy.sum(), BUY), buy_t[buy], pp[buy], None, live[buy] * qty[buy], qty[buy], None, np.nonzero(buy)[0]),
        (soc_sess, soc_type, soc_t, sched.slot_product[soc_slot], None, None, None, comment_code, None),
    ]
    cols: dict[str, list] = {k: [] for k in ("sess", "type", "t", "prod", "dwell", "price", "qty", "comment", "pair")}
    for sess_a, ty, t, prod, dw, pr, q, cm, pair in parts:
        n = len(sess_a)
        cols["sess"].append(sess_a)
        cols["type"].append(ty)
        cols["t"].append(t)
        cols["prod"].append(prod)
        cols["dwell"].append(z(n, np.int64) if dw is None else dw)
        cols["price"].append(np.full(n, -1, np.int64) if pr is None else pr)
        cols["qty"].append(z(n, np.int64) if q is None else q)
        cols["comment"].append(np.full(n, -1, np.int64) if cm is None else cm)
        cols["pair"].append(np.full(n, -1, np.int64) if pair is None else pair)
    ev = {k: np.concatenate(v).astype(np.int64) for k, v in cols.items()}
    ev["viewer"] = sv[ev["sess"]]

    ev = _limit_rates(ev)
    o = np.lexsort((ev["type"], ev["sess"], ev["t"]))
    ev = {k: a[o] for k, a in ev.items()}
    ev["stream"] = stream[ev["sess"]]
    n_ev = len(ev["t"])
    ev["eid"] = _mix64((np.uint64(d.toordinal()) << np.uint64(32)) + np.arange(n_ev, dtype=np.uint64), world.seed * 7919 + 1)

    # -- late arrivals: weighted to the last hours of the day --------------------------------
    n_late = int(round(_LATE_SHARE * n_ev))
    key = (ev["t"] - _DAY_MS) / 7.2e6 + r.gumbel(size=n_ev)
    late_mask = np.zeros(n_ev, bool)
    if n_late:
        late_mask[np.argpartition(-key, n_late - 1)[:n_late]] = True

    # -- state for tomorrow (from the final events) -------------------------------------------
    typ, evc = ev["type"], world.p_cat[np.maximum(ev["prod"], 0)]
    gk = ev["viewer"] * _NC + evc
    sel_c, sel_k = typ == CLICK, typ == CART
    sel_b = (typ == BUY) & _IS_TRIGGER[evc]
    ts = ev["t"] / 1000.0
    ck, cv = _carry(state.click_k, state.click_v, gk[sel_c], ts[sel_c], _LAM_CLICK)
    kk, kv = _carry(state.cart_k, state.cart_v, gk[sel_k], ts[sel_k], _LAM_CART)
    tk, tv = _carry(state.trig_k, state.trig_v, ev["viewer"][sel_b] * _NT + _TRIGGER_OF_CAT[evc[sel_b]],
                    ts[sel_b], _LAM_TRIG)
    day = _Day(date=d, sched=sched, ev=ev, late_mask=late_mask, active_viewers=np.unique(sv))
    nxt = _State(click_k=ck, click_v=cv, cart_k=kk, cart_v=kv, trig_k=tk, trig_v=tv)
    return day, nxt


def _limit_rates(ev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep normal viewers far below the cleaning stage's bot rule.

    At most 8 events in any 60 s window: the latest social event of a crowded window goes
    first, else its latest slot view (with its funnel), until no window is crowded (enter
    and leave alone never crowd a window: sessions are >= 90 s apart). At most 4 purchases in any hour: extra purchases
    are dropped (the cart stays, as an abandoned cart)."""
    o = np.lexsort((ev["t"], ev["viewer"]))
    ev = {k: a[o] for k, a in ev.items()}  # dropping rows below keeps this order
    for _ in range(200):
        key = ev["viewer"] * _BIG + ev["t"]
        lo = np.searchsorted(key, key - 60_000, "right")
        n = len(key)
        ar = np.arange(n)
        bad = np.nonzero(ar - lo + 1 > _MAX_EVENTS_PER_MIN)[0]
        if len(bad) == 0:
            break
        # in each crowded window drop its latest social event, or else its latest slot view
        last_soc = np.maximum.accumulate(np.where(np.isin(ev["type"], _SOCIAL), ar, -1))[bad]
        last_pair = np.maximum.accumulate(np.where(ev["pair"] >= 0, ar, -1))[bad]
        use_soc = last_soc >= lo[bad]
        drop = np.zeros(n, bool)
        drop[last_soc[use_soc]] = True
        rest = ~use_soc & (last_pair >= lo[bad])
        drop |= np.isin(ev["pair"], ev["pair"][last_pair[rest]])
        if not drop.any():
            break
        ev = {k: a[~drop] for k, a in ev.items()}
    buys = np.nonzero(ev["type"] == BUY)[0]
    if len(buys):
        kb = ev["viewer"][buys] * _BIG + ev["t"][buys]
        ob = np.argsort(kb, kind="stable")
        kb, bi = kb[ob], buys[ob]
        c = np.arange(len(kb)) - np.searchsorted(kb, kb - 3_600_000, "right") + 1
        keep = np.ones(len(ev["t"]), bool)
        keep[bi[c > _MAX_BUYS_PER_HOUR]] = False
        ev = {k: a[keep] for k, a in ev.items()}
    return ev


# ----------------------------------------------------------------------------------------
# JSON lines
# ----------------------------------------------------------------------------------------
_ET_TABLE = _table([t.encode() for t in EVENT_TYPES])
_QTY_TABLE = _table([b"null", b"1", b"2", b"3"])
_APP_TABLE = _table([a.encode() for a in _APP_VERSIONS])
_COMMENT_TABLE = _table([b"null"] + [json.dumps(c, ensure_ascii=False).encode() for c in _COMMENTS])
_TZ_TABLE = _table(_TZ_TEXT)


def _ts_matrix(d: dt.date, t_ms: np.ndarray, tz: np.ndarray) -> np.ndarray:
    """'YYYY-MM-DDTHH:MM:SS.mmm+HH:MM' (29 bytes) of UTC ms since d's midnight, in local time."""
    local = t_ms + _TZ_MINUTES[tz] * 60_000
    shift = np.floor_divide(local, _DAY_MS)
    tod = local - shift * _DAY_MS
    dates = _table([(d + dt.timedelta(days=k)).isoformat().encode() for k in (-1, 0, 1)])[0]
    m = np.empty((len(t_ms), 29), np.uint8)
    m[:, :10] = dates[np.clip(shift + 1, 0, 2)]
    m[:, 10] = ord("T")
    m[:, 11:13] = _fixed_digits(tod // 3_600_000, 2)
    m[:, 13] = ord(":")
    m[:, 14:16] = _fixed_digits(tod // 60_000 % 60, 2)
    m[:, 16] = ord(":")
    m[:, 17:19] = _fixed_digits(tod // 1000 % 60, 2)
    m[:, 19] = ord(".")
    m[:, 20:23] = _fixed_digits(tod % 1000, 3)
    m[:, 23:29] = _TZ_TABLE[0][tz]
    return m


def _event_lines(world: _World, day: _Day, rows: np.ndarray, ev: dict[str, np.ndarray] | None = None,
                 sess_salt: int = 0) -> tuple[bytes, np.ndarray]:
    """Assemble the JSON lines of the given event rows (in that order); return the bytes and
    the line offsets (n+1). Keys are always all present, in the contract's order."""
    ev = day.ev if ev is None else ev
    d = day.date
    date8 = d.strftime("%Y%m%d").encode()
    salt = world.seed * 104729 + 17
    out, offs = [], [np.zeros(1, np.int64)]
    base = 0
    for a in range(0, len(rows), 65536):
        i = rows[a:a + 65536]
        m = len(i)
        v = ev["viewer"][i]
        sess_hash = _mix64((np.uint64(d.toordinal()) << np.uint64(32)) + ev["sess"][i].astype(np.uint64)
                           + np.uint64(sess_salt), salt)
        prod = ev["prod"][i]
        pm = np.empty((m, 10), np.uint8)
        pm[:, 0] = pm[:, 9] = ord('"')
        pm[:, 1] = ord("p")
        pm[:, 2:9] = _fixed_digits(np.maximum(prod, 0), 7)
        pm[prod < 0, :4] = np.frombuffer(b"null", np.uint8)
        pl = np.where(prod < 0, 4, 10)
        price = ev["price"][i]
        dig, dl = _var_digits(np.maximum(price, 0) // 100, 7)
        prm = np.zeros((m, 10), np.uint8)
        prm[:, :7] = dig
        rr = np.arange(m)
        prm[rr, dl] = ord(".")
        c2 = _fixed_digits(np.maximum(price, 0) % 100, 2)
        prm[rr, dl + 1] = c2[:, 0]
        prm[rr, dl + 2] = c2[:, 1]
        prl = dl + 3
        prm[price < 0, :4] = np.frombuffer(b"null", np.uint8)
        prl = np.where(price < 0, 4, prl)
        dw, dwl = _var_digits(ev["dwell"][i], 9)
        ipv = world.v["ip"][v]
        ip_segs: list = []
        for k in range(4):
            ip_segs.append(_var_digits(ipv[:, k], 3))
            if k < 3:
                ip_segs.append(b".")
        et = ev["type"][i]
        q = ev["qty"][i]
        cm = ev["comment"][i] + 1
        app = world.v["app"][v]
        segs = [
            b'{"event_id":"e', (_hex(ev["eid"][i], 16), None),
            b'","viewer_id":"v', (_fixed_digits(v, 7), None),
            b'","session_id":"se', (_hex(sess_hash, 16), None),
            b'","stream_id":"st' + date8, (_fixed_digits(ev["stream"][i], 4), None),
            b'","host_id":"h', (_fixed_digits(day.sched.host[ev["stream"][i]], 4), None),
            b'","product_id":', (pm, pl),
            b',"event_type":"', (_ET_TABLE[0][et], _ET_TABLE[1][et]),
            b'","event_ts":"', (_ts_matrix(d, ev["t"][i], world.v["tz"][v]), None),
            b'","dwell_ms":', (dw, dwl),
            b',"price_paid":', (prm, prl),
            b',"quantity":', (_QTY_TABLE[0][q], _QTY_TABLE[1][q]),
            b',"device_id":"d', (_hex(_mix64(v.astype(np.uint64), salt + 3), 12), None),
            b'","ip":"', *ip_segs,
            b'","comment_text":', (_COMMENT_TABLE[0][cm], _COMMENT_TABLE[1][cm]),
            b',"app_version":"', (_APP_TABLE[0][app], _APP_TABLE[1][app]),
            b'"}\n',
        ]
        buf, lens = _compact(segs, m)
        out.append(buf)
        offs.append(base + np.cumsum(lens))
        base += len(buf)
    return b"".join(out), np.concatenate(offs)


def _split(buf: bytes, offs: np.ndarray) -> list[bytes]:
    """Lines (with their newline) of an assembled buffer; used for small row sets only."""
    return [buf[offs[k]:offs[k + 1]] for k in range(len(offs) - 1)]


# ----------------------------------------------------------------------------------------
# faults and files
# ----------------------------------------------------------------------------------------
def _corrupt(kind: str, line: bytes, r: np.random.Generator, d: dt.date) -> bytes:
    """One fault on one valid line (see the module docstring for exactly what changes)."""
    if kind == "malformed_json":
        cut = int(r.integers(8, len(line) - 3))
        while line[cut] >= 0x80:  # cut at a character boundary so the line stays UTF-8
            cut -= 1
        return line[:cut] + b"\n"
    obj = json.loads(line)
    if kind == "non_utf8":
        obj["comment_text"] = (obj.get("comment_text") or "") + "\udcff\udcfe"
        s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return s.encode("utf-8", "surrogateescape") + b"\n"
    if kind == "wrong_type":
        fields = ["dwell_ms"] + [k for k in ("quantity", "price_paid") if obj[k] is not None]
        obj[fields[int(r.integers(len(fields)))]] = str(r.choice(["abc", "n/a", "12ms", "unknown", "--"]))
    elif kind == "missing_required":
        del obj[str(r.choice(["event_id", "viewer_id", "event_type", "event_ts"]))]
    elif kind == "unknown_event_type":
        obj["event_type"] = str(r.choice(["heartbeat", "view_prodcut", "poke", "scroll", "swipe_up"]))
    elif kind == "bad_dwell":
        obj["dwell_ms"] = int(-r.integers(1, 100_000)) if r.random() < 0.5 else int(r.integers(86_400_001, 10 ** 10))
    elif kind in ("future_ts", "past_ts"):
        ts = dt.datetime.fromisoformat(obj["event_ts"])
        days = int(r.integers(2, 31)) if kind == "future_ts" else -int(r.integers(61, 401))
        obj["event_ts"] = (ts + dt.timedelta(days=days)).isoformat(timespec="milliseconds")
    elif kind == "unknown_product":
        obj["product_id"] = f"p9{int(r.integers(0, 10 ** 6)):06d}"
    elif kind == "unknown_stream":
        obj["stream_id"] = f"st{d:%Y%m%d}{int(r.integers(0, 10 ** 5)):05d}"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@dataclass
class _Plan:
    """Which own rows go where, and which would be corrupted if faults are on.

    The plan is computed with or without faults (its own random stream), so the valid
    lines and the replay pool handed to the next day do not depend on the flag."""

    file_of: np.ndarray
    victims: dict[str, np.ndarray]
    pool_rows: np.ndarray
    r: np.random.Generator


def _plan(world: _World, day: _Day) -> _Plan:
    """Files by session (a device's batch lands in one file); disjoint victims per fault
    kind among own, non-late rows; a 1 % replay pool for tomorrow among the rest."""
    r = _rng(world.seed, _T_FAULT, day.date.toordinal())
    ev = day.ev
    n = len(ev["t"])
    file_of = (_mix64(ev["sess"].astype(np.uint64), world.seed + day.date.toordinal())
               % np.uint64(_FILES_PER_DAY)).astype(np.int64)
    cand = np.nonzero(~day.late_mask)[0]
    cand = cand[r.permutation(len(cand))]
    taken = np.zeros(n, bool)
    victims: dict[str, np.ndarray] = {}
    typ = ev["type"]
    for kind in LINE_FAULTS:
        k = max(1, int(round(r.uniform(0.002, 0.004) * n)))
        ok = ~taken[cand]
        if kind == "non_utf8":
            ok &= typ[cand] == COMMENT
        elif kind == "unknown_product":
            ok &= np.isin(typ[cand], (VIEW, CLICK, CART, BUY))
        pick = cand[ok][:k]
        taken[pick] = True
        victims[kind] = np.sort(pick)
    free = np.nonzero(~taken & ~day.late_mask)[0]
    pool_n = min(len(free), max(20, int(0.01 * n)))
    pool_rows = np.sort(r.choice(free, pool_n, replace=False)) if pool_n else free
    return _Plan(file_of=file_of, victims=victims, pool_rows=pool_rows, r=r)


def _bots(world: _World, day: _Day, n_own: int, exclude: np.ndarray) -> dict[str, np.ndarray]:
    """Bot bursts: >= 130 events within 100 s on one slot, by accounts idle that day."""
    r = _rng(world.seed, _T_BOT, day.date.toordinal())
    nb = max(1, int(round(_BOT_SHARE * n_own / 195)))
    nv = world.n_viewers(day.date)
    idle = np.setdiff1d(np.arange(nv), exclude)
    bots = r.choice(idle, nb, replace=False)
    sched = day.sched
    cols: dict[str, list] = {k: [] for k in ("viewer", "sess", "type", "t", "prod", "dwell", "price", "qty", "comment", "stream")}
    for b in range(nb):
        slot = int(r.integers(len(sched.slot_stream)))
        k = int(r.integers(130, 261))
        start = sched.slot_start[slot] + int(r.integers(0, sched.slot_end[slot] - sched.slot_start[slot] - 100_000))
        t = np.sort(start + r.integers(0, 100_000, k))
        ty = r.choice([VIEW, LIKE, CLICK, CART], k, p=[0.55, 0.30, 0.10, 0.05])
        ty[0], ty[-1] = ENTER, LEAVE
        dwell = np.where(ty == VIEW, r.integers(150, 900, k), 0)
        dwell[-1] = t[-1] - t[0]
        prod = np.where(np.isin(ty, (ENTER, LEAVE)), -1, sched.slot_product[slot])
        cols["viewer"].append(np.full(k, bots[b]))
        cols["sess"].append(np.full(k, b))
        cols["type"].append(ty)
        cols["t"].append(t)
        cols["prod"].append(prod)
        cols["dwell"].append(dwell)
        cols["price"].append(np.full(k, -1))
        cols["qty"].append(np.where(ty == CART, 1, 0))
        cols["comment"].append(np.full(k, -1))
        cols["stream"].append(np.full(k, sched.slot_stream[slot]))
    ev = {k: np.concatenate(v).astype(np.int64) for k, v in cols.items()}
    ev["eid"] = _mix64((np.uint64(day.date.toordinal()) << np.uint64(32)) + np.uint64(1 << 30)
                       + np.arange(len(ev["t"]), dtype=np.uint64), world.seed * 7919 + 1)
    return ev


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file then rename: a reader never sees a half-written CSV or ledger."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    _write_atomic(path, df.to_csv(index=False, lineterminator="\n").encode())


def _iso_z(d: dt.date, ms: np.ndarray) -> list[str]:
    """CSV timestamps: UTC, whole seconds, 'Z'."""
    base = np.datetime64(d.isoformat(), "ms")
    return [s + "Z" for s in np.datetime_as_string(base + ms.astype("timedelta64[ms]"), unit="s")]


def _write_schedule(root: Path, sched: _Schedule) -> None:
    """streams_D.csv and stream_products_D.csv (slots in air order within each stream)."""
    d = sched.date
    date8 = d.strftime("%Y%m%d")
    sid = np.array([f"st{date8}{i:04d}" for i in range(len(sched.host))], dtype=object)
    _write_csv(root / "schedule" / f"streams_{d.isoformat()}.csv", pd.DataFrame({
        "stream_id": sid, "host_id": [f"h{h:04d}" for h in sched.host],
        "start_ts": _iso_z(d, sched.start), "end_ts": _iso_z(d, sched.end)}))
    _write_csv(root / "schedule" / f"stream_products_{d.isoformat()}.csv", pd.DataFrame({
        "stream_id": sid[sched.slot_stream], "product_id": [f"p{p:07d}" for p in sched.slot_product],
        "slot_start_ts": _iso_z(d, sched.slot_start), "slot_end_ts": _iso_z(d, sched.slot_end),
        "live_price": [f"{c // 100}.{c % 100:02d}" for c in sched.slot_live_cents]}))


def _write_day(root: Path, world: _World, day: _Day, plan: _Plan, state_in: _State,
               prev_written: bool, faults: bool) -> dict:
    """Write the day's event files (with faults if asked) and return its ledger entry.

    Each file is a sequence of entries: an own row (assembled by ``_event_lines``) or a raw
    line (a corrupted row, a late arrival, a replayed or bot line). Extra lines go to random
    positions; counts are taken from what was placed, so the ledger is exact."""
    d = day.date
    ev = day.ev
    r = plan.r
    n = len(ev["t"])
    # entries per file: >= 0 an own row, < 0 a raw line (-1 - index into raws)
    raws: list[bytes] = []
    counts = {k: 0 for k in FAULT_KINDS}
    replace = np.full(n, -1, np.int64)  # own row -> raw index of its corrupted version
    if faults:
        vic = np.concatenate([plan.victims[k] for k in LINE_FAULTS])
        vic_kind = np.concatenate([np.full(len(plan.victims[k]), i) for i, k in enumerate(LINE_FAULTS)])
        buf, offs = _event_lines(world, day, vic)
        for j, line in enumerate(_split(buf, offs)):
            replace[vic[j]] = len(raws)
            raws.append(_corrupt(LINE_FAULTS[vic_kind[j]], line, r, d))
        for k in LINE_FAULTS:
            counts[k] = len(plan.victims[k])
    own = np.nonzero(~day.late_mask)[0]
    files = [own[plan.file_of[own] == f] for f in range(_FILES_PER_DAY)]  # each in time order
    inserts: list[list[int]] = [[] for _ in range(_FILES_PER_DAY)]  # extra entries per file

    def add_raw(lines: list[bytes], f_choices: np.ndarray) -> None:
        for line, f in zip(lines, f_choices, strict=True):
            inserts[int(f)].append(-1 - len(raws))
            raws.append(line)

    late = state_in.late_lines
    add_raw(late, r.integers(0, _FILES_PER_DAY, len(late)))
    if faults:
        valid = own[replace[own] < 0]
        k_dw = max(1, int(round(r.uniform(0.002, 0.004) * n)))
        k_dr = max(1, int(round(r.uniform(0.002, 0.004) * n)))
        srcs = r.choice(valid, min(len(valid), k_dw + k_dr), replace=False)
        for s in srcs[:k_dw]:
            inserts[int(plan.file_of[s])].append(int(s))
        counts["dup_within_file"] = len(srcs[:k_dw])
        rest = srcs[k_dw:]
        n_prev = min(len(state_in.pool_lines), len(rest) // 2) if prev_written else 0
        pool_pick = r.choice(len(state_in.pool_lines), n_prev, replace=False) if n_prev else []
        replayed = [state_in.pool_lines[i] for i in pool_pick]
        add_raw(replayed, r.integers(0, _FILES_PER_DAY, n_prev))
        n_rep = n_prev
        for s in rest[n_prev:]:
            f = int(plan.file_of[s])
            if f < _FILES_PER_DAY - 1:  # a copy of an earlier file's line in a later file
                inserts[int(r.integers(f + 1, _FILES_PER_DAY))].append(int(s))
                n_rep += 1
        counts["dup_replay"] = n_rep
        # bot accounts have no other line in this folder (not even a late or replayed one)
        replay_viewers = np.array([int(json.loads(x)["viewer_id"][1:]) for x in replayed], np.int64)
        exclude = np.unique(np.concatenate([day.active_viewers, state_in.late_viewers, replay_viewers]))
        bev = _bots(world, day, n, exclude)
        bday = _Day(date=d, sched=day.sched, ev=bev, late_mask=np.zeros(0, bool), active_viewers=np.zeros(0))
        bbuf, boffs = _event_lines(world, bday, np.arange(len(bev["t"])), sess_salt=1 << 31)
        blines = _split(bbuf, boffs)
        bfile = r.integers(0, _FILES_PER_DAY, int(bev["sess"].max()) + 1)[bev["sess"]]
        add_raw(blines, bfile)
        counts["bot_events"] = len(blines)
    n_empty = int(r.integers(1, 3)) if faults else 0

    folder = root / "events" / f"date={d.isoformat()}"
    tmp = folder.with_name(".tmp_" + folder.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    file_entries = []
    total = 0
    for f in range(_FILES_PER_DAY):
        base = files[f]
        ins = np.array(inserts[f], np.int64)
        pos = r.integers(0, len(base) + 1, len(ins))
        ent = np.insert(base, np.sort(pos), ins[r.permutation(len(ins))]) if len(ins) else base
        ent = np.where((ent >= 0) & (replace[np.maximum(ent, 0)] >= 0), -1 - replace[np.maximum(ent, 0)], ent)
        rows = ent[ent >= 0]
        buf, offs = _event_lines(world, day, rows)
        pieces: list[bytes] = []
        raw_at = np.nonzero(ent < 0)[0]
        # rows between raw entries are contiguous in buf: k-th raw entry sits after
        # (raw_at[k] - k) assembled rows
        prev = 0
        for k, p in enumerate(raw_at):
            upto = p - k
            pieces.append(buf[offs[prev]:offs[upto]])
            pieces.append(raws[-1 - ent[p]])
            prev = upto
        pieces.append(buf[offs[prev]:])
        data = b"".join(pieces)
        gz = f in _GZ_FILES
        name = f"part-{f:05d}.jsonl" + (".gz" if gz else "")
        if gz:
            with open(tmp / name, "wb") as fh:
                with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=1, mtime=0) as g:
                    g.write(data)
        else:
            (tmp / name).write_bytes(data)
        file_entries.append({"path": f"events/date={d.isoformat()}/{name}", "lines": len(ent), "gz": gz})
        total += len(ent)
    for k in range(n_empty):
        name = f"part-{_FILES_PER_DAY + k:05d}.jsonl"
        (tmp / name).write_bytes(b"")
        file_entries.append({"path": f"events/date={d.isoformat()}/{name}", "lines": 0, "gz": False})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    counts["empty_files"] = n_empty
    line_faults = sum(v for k, v in counts.items() if k != "empty_files")
    return {
        "files": file_entries, "lines": total, "empty_files": n_empty, "late_events": len(late),
        "valid_events": total - line_faults, "faults": counts,
    }


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------
def _state_dir(root: Path, d: dt.date) -> Path:
    """Where the state handed from date d to d+1 lives."""
    return root / "_ledger" / "state" / d.isoformat()


def _handoff(world: _World, day: _Day, plan: _Plan, nxt: _State) -> _State:
    """Fill in the lines the next day needs: late arrivals and the replay pool."""
    late_rows = np.nonzero(day.late_mask)[0]
    buf, offs = _event_lines(world, day, late_rows)
    nxt.late_lines = _split(buf, offs)
    nxt.late_viewers = np.unique(day.ev["viewer"][late_rows])
    buf, offs = _event_lines(world, day, plan.pool_rows)
    nxt.pool_lines = _split(buf, offs)
    return nxt


def _load_ledger(root: Path) -> dict:
    """The ledger of earlier calls (empty for a fresh landing root)."""
    p = root / "_ledger" / "ledger.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _save_ledger(root: Path, ledger: dict) -> None:
    """Written after every day, so an interrupted call leaves the finished days counted."""
    p = root / "_ledger" / "ledger.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    ledger["dates"] = dict(sorted(ledger["dates"].items()))
    _write_atomic(p, (json.dumps(ledger, indent=2, sort_keys=True) + "\n").encode())


def generate(landing_root: Path | str, start: dt.date, days: int, scale: float = 1.0,
             faults: bool = False, seed: int = 7) -> dict:
    """Write ``days`` days of landing data from ``start`` and return the merged ledger.

    Writes events/date=D/part-*.jsonl[.gz], catalog/products_D.csv and the schedule of
    every generated day plus the day after the last one, and ``_ledger/ledger.json``
    (merged with earlier calls, keyed by date). A landing root holds one world: the seed
    and scale must match earlier calls and ``start`` must not precede its epoch (raises
    UsageError, exit 2, like a bad --days, --scale or --seed). Days between the epoch and
    ``start`` that have no saved state are simulated (not written) first, so every date's
    bytes are the same whatever the calls.
    """
    root = Path(landing_root)
    if isinstance(start, str):
        start = dt.date.fromisoformat(start)
    if isinstance(start, dt.datetime) or not isinstance(start, dt.date):
        raise ValueError(f"start must be a date, got {start!r}")
    if int(days) < 1:
        raise UsageError(f"--days must be >= 1, got {days}")
    if not scale > 0:
        raise UsageError(f"--scale must be > 0, got {scale}")
    if int(seed) < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    days, seed, scale = int(days), int(seed), float(scale)
    ledger = _load_ledger(root)
    if ledger and (ledger.get("seed") != seed or float(ledger.get("scale")) != scale):
        raise UsageError(
            f"{root} already holds seed={ledger.get('seed')} scale={ledger.get('scale')}; "
            f"use the same seed and scale or a fresh landing root")
    epoch = dt.date.fromisoformat(ledger["epoch"]) if ledger.get("epoch") else start
    if start < epoch:
        raise UsageError(f"start {start} precedes this landing root's world epoch {epoch}; "
                         f"use a fresh landing root")
    ledger = {"seed": seed, "scale": scale, "epoch": epoch.isoformat(), "dates": ledger.get("dates", {})}
    for sub in ("events", "catalog", "schedule", "_ledger/state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    world = _World(seed, scale, epoch)

    # the state at start: the latest saved one before it, then simulate forward
    d = start
    while d > epoch and not (_state_dir(root, d - dt.timedelta(days=1)) / "late.jsonl").exists():
        d -= dt.timedelta(days=1)
    state = _State.load(_state_dir(root, d - dt.timedelta(days=1))) if d > epoch else _State()
    while d < start:
        log.info("generate: simulating %s (not written) to reach %s", d, start)
        day, nxt = _simulate(world, d, world.schedule(d), state)
        state = _handoff(world, day, _plan(world, day), nxt)
        state.save(_state_dir(root, d))
        d += dt.timedelta(days=1)

    for k in range(days):
        t_start = time.perf_counter()
        d = start + dt.timedelta(days=k)
        sched = world.schedule(d)
        _write_csv(root / "catalog" / f"products_{d.isoformat()}.csv", world.catalog(d))
        _write_schedule(root, sched)
        day, nxt = _simulate(world, d, sched, state)
        plan = _plan(world, day)
        prev_written = (d - dt.timedelta(days=1)).isoformat() in ledger["dates"]
        entry = _write_day(root, world, day, plan, state, prev_written, faults)
        state = _handoff(world, day, plan, nxt)
        state.save(_state_dir(root, d))
        ledger["dates"][d.isoformat()] = entry
        _save_ledger(root, ledger)
        log.info("generate %s: %d lines (%d valid, %d late, %d faulty) in %.1fs", d, entry["lines"],
                 entry["valid_events"], entry["late_events"], entry["lines"] - entry["valid_events"],
                 time.perf_counter() - t_start)
    _write_schedule(root, world.schedule(start + dt.timedelta(days=days)))
    return ledger
