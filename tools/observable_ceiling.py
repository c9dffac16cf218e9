"""How much of the holdout can observable features explain? A gradient-boosted diagnostic.

`streamrank evaluate` compares the attention model with most-popular, pop_category and ALS.
When the model misses a quality target, the question is whether it leaves signal in the
viewer's history unused, or whether the history does not hold more. This script answers it
with a model of a different kind on the same rows: scikit-learn's HistGradientBoosting on
hand-built features, evaluated with evaluate's own protocol and metric code.

- Ranking: one row per (viewer, candidate) with the candidate's popularity (evaluate's
  counts), the viewer's history in its category (share, per event type, recency), in the
  product itself, with its host, near its slot hour, in its brand, its list price against
  what the viewer paid and saw, and the viewer's purchase-power inputs. Trained pointwise
  on the 'train' split's rows whose first cart is among their candidates (the target
  against up to 30 sampled competitors), scored on the 'test' split's candidate protocol:
  NDCG@10 of the target among the row's real candidates, next to most-popular's.
- Intent: the 8 purchase-power inputs, then those plus 19 counts from the event sequence
  (events in the last 1/3/7 days, active days, per event type), with boosting and with a
  logistic regression on log1p of them; AUC on the 'test' split.

Run after `streamrank features --date D` (it reads gold/training_examples, gold/vocabularies,
bronze/products and silver through the warehouse of the conf):

    python tools/observable_ceiling.py --date 2026-11-07 [--set warehouse.root=...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import numpy as np
import pyarrow.compute as pc
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from streamrank import evaluate as E
from streamrank import metrics as M
from streamrank.config import load_config
from streamrank.context import Context

NEGATIVES = 30
SEED = 0
N_EVENT_IDS = 14  # event vocabulary: pad, unk and the ten event types


def _split_rows(ctx: Context, day: dt.date) -> dict[str, E.Holdout]:
    tab = E._partition(ctx, E.TRAINING, day, None)  # the holdout's own reader, all splits
    return {s: E.holdout_from_arrow(tab.filter(pc.equal(tab.column("split"), s))) for s in ("train", "test")}


def _catalog_maps(ctx: Context, day: dt.date, product_vocab: dict[str, int], n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Brand index and list price per product id of D's vocabulary (0 where unknown)."""
    cat = ctx.table("bronze/products").to_arrow(partitions={"snapshot_date": [day]}).to_pylist()
    brands = {b: i + 1 for i, b in enumerate(sorted({r["brand"] for r in cat if r["brand"]}))}
    brand, price = np.zeros(n_ids, np.int64), np.zeros(n_ids)
    for r in cat:
        i = product_vocab.get(r["product_id"])
        if i is not None and i < n_ids:
            brand[i] = brands.get(r["brand"], 0)
            price[i] = float(r["list_price"] or 0.0)
    return brand, price


class PairFeatures:
    """Features of (holdout row, candidate position) pairs; see the module docstring."""

    def __init__(self, counts: np.ndarray, category: np.ndarray, brand: np.ndarray, price: np.ndarray) -> None:
        self.counts, self.category, self.brand, self.price = counts, category, brand, price

    def __call__(self, h: E.Holdout, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        c = h.cand_products[rows, cols]
        hp, hc, he, hh, hr, hd = (a[rows] for a in (h.hist_product, h.hist_category, h.hist_event,
                                                     h.hist_host, h.hist_hour, h.hist_dt))
        valid = hp > 0
        n = np.maximum((he > 0).sum(1), 1)
        pp = h.pp_features[rows]

        def last(mask: np.ndarray) -> np.ndarray:  # hours since the latest such event (1e4: never)
            return np.where(mask, hd, 1e4).min(1)

        same_cat = (hc == self.category[c][:, None]) & valid
        same_p = hp == c[:, None]
        same_h = (hh == h.cand_host[rows, cols][:, None]) & (hh > 0)
        gap = np.abs(hr - h.cand_hour[rows, cols][:, None])
        near_hour = (np.minimum(gap, 24 - gap) <= 2) & (hr > 0)
        cb = self.brand[c]
        same_b = (self.brand[hp] == cb[:, None]) & valid & (cb[:, None] > 0)
        lp = np.log1p(self.price[c])
        with np.errstate(invalid="ignore"):
            seen = np.nanmean(np.where(valid, np.log1p(self.price[hp]), np.nan), 1)
        cols_out = [
            np.log1p(self.counts[c]), same_cat.sum(1) / n, last(same_cat),
            *[(same_cat & (he == e)).sum(1) for e in range(2, N_EVENT_IDS)],
            same_p.sum(1), *[(same_p & (he == e)).sum(1) for e in range(2, N_EVENT_IDS)],
            same_h.sum(1) / n, last(same_h), near_hour.sum(1) / n, h.cand_hour[rows, cols],
            (h.cand_products[rows] >= E.FIRST_REAL_ID).sum(1), h.hist_len[rows],
            same_b.sum(1) / n, lp, lp - pp[:, 5], lp - seen, *pp.T,
        ]
        return np.stack(cols_out, 1).astype(np.float32)


def ranking(h_train: E.Holdout, h_test: E.Holdout, features: PairFeatures, counts: np.ndarray) -> dict[str, float]:
    rng = np.random.default_rng(SEED)
    real = h_train.cand_products >= E.FIRST_REAL_ID
    is_t = h_train.cand_products == h_train.target_product[:, None]
    rows, cols, labels = [], [], []
    for r in np.nonzero((h_train.target_product >= E.FIRST_REAL_ID) & (is_t & real).any(1) & (real.sum(1) > 1))[0]:
        neg = np.nonzero(real[r] & ~is_t[r])[0]
        picks = [int(np.argmax(is_t[r]))] + list(rng.choice(neg, min(NEGATIVES, len(neg)), replace=False))
        rows += [r] * len(picks)
        cols += picks
        labels += [1] + [0] * (len(picks) - 1)
    model = HistGradientBoostingClassifier(max_iter=400, learning_rate=0.05, random_state=SEED)
    model.fit(features(h_train, np.asarray(rows), np.asarray(cols)), np.asarray(labels))

    tgt, cands = h_test.target_product, h_test.cand_products
    comp = (cands >= E.FIRST_REAL_ID) & (cands != tgt[:, None])
    at = cands == tgt[:, None]
    idx = np.nonzero((tgt >= E.FIRST_REAL_ID) & comp.any(1) & at.any(1))[0]
    b, width = len(idx), cands.shape[1]
    scores = model.predict_proba(features(h_test, np.repeat(idx, width), np.tile(np.arange(width), b)))[:, 1]
    scores = scores.reshape(b, width)
    own = scores[np.arange(b), np.argmax(at[idx], 1)]
    pop = E.popularity_scores(counts)
    gb = M.ndcg_at_k(M.ranks_from_scores(own, scores, comp[idx]), 10)
    mp = M.ndcg_at_k(M.ranks_from_scores(pop[tgt[idx]], pop[cands[idx]], comp[idx]), 10)
    return {"train_rows": float(len(set(rows))), "ranked_rows": float(b), "most_popular_ndcg_at_10": mp,
            "gbdt_ndcg_at_10": gb, "gbdt_vs_most_popular": gb / mp}


def _sequence_counts(h: E.Holdout) -> np.ndarray:
    d = np.where(h.hist_event > 0, h.hist_dt.astype(np.float64), np.inf)
    recent = [(d < hours).sum(1) for hours in (24, 72, 168)]
    days = np.floor(np.where(np.isfinite(d), d, -1) / 24)
    active = np.array([len(set(r[r >= 0])) for r in days])
    per_type = [((h.hist_event == e) & (d < 168)).sum(1) for e in range(2, N_EVENT_IDS)]
    first_last = [np.where(np.isfinite(d), d, 999).min(1), np.where(np.isfinite(d), d, -1).max(1)]
    return np.stack([h.hist_len, *recent, active, *first_last, *per_type], 1).astype(np.float64)


def intent(h_train: E.Holdout, h_test: E.Holdout) -> dict[str, float]:
    out = {}
    sets = {"pp": lambda h: h.pp_features.astype(np.float64),
            "pp_seq": lambda h: np.concatenate([h.pp_features, _sequence_counts(h)], 1)}
    for name, make in sets.items():
        x_tr, x_te = make(h_train), make(h_test)
        gb = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=SEED)
        gb.fit(x_tr, h_train.label_purchase)
        lr = LogisticRegression(max_iter=2000).fit(np.log1p(np.abs(x_tr)), h_train.label_purchase)
        out[f"gbdt_auc_{name}"] = roc_auc_score(h_test.label_purchase, gb.predict_proba(x_te)[:, 1])
        out[f"logreg_auc_{name}"] = roc_auc_score(h_test.label_purchase, lr.predict_proba(np.log1p(np.abs(x_te)))[:, 1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--date", required=True, type=dt.date.fromisoformat)
    ap.add_argument("--conf", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    ctx = Context(load_config(args.conf, args.set))
    splits = _split_rows(ctx, args.date)
    vocab = E.load_vocab(ctx, args.date)
    counts = E.popularity(ctx, args.date, vocab)
    n_ids = max(counts.shape[0], *(int(h.cand_products.max()) + 1 for h in splits.values()),
                *(int(h.hist_product.max()) + 1 for h in splits.values()))
    counts = np.pad(counts, (0, n_ids - counts.shape[0]))
    known = np.asarray(E.product_categories(ctx, args.date, vocab), dtype=np.int64)  # the model's own lookup
    category = np.pad(known, (0, max(0, n_ids - known.shape[0])))[:n_ids]
    brand, price = _catalog_maps(ctx, args.date, vocab.get("product") or {}, n_ids)
    figures = {**ranking(splits["train"], splits["test"], PairFeatures(counts, category, brand, price), counts),
               **intent(splits["train"], splits["test"])}
    for key, value in figures.items():
        print(f"{key:28s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
