"""Unit tests of the attention model: shapes, causality, time decay, factorised scoring, learning."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from streamrank.model import (
    FIRST_REAL_ID,
    ModelConfig,
    StreamRankModel,
    apply_calibration,
    batch_to_tensors,
    dwell_bucket,
    fit_platt,
    softplus_inverse,
)

N_PRODUCTS, N_CATEGORIES, N_EVENTS = 60, 8, 11


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy shared CPU."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def small_cfg(**kw) -> ModelConfig:
    base = dict(n_products=N_PRODUCTS, n_categories=N_CATEGORIES, n_event_types=N_EVENTS, seq_len=12,
                d_model=16, n_heads=2, n_layers=2, dropout=0.0, num_negatives=20)
    base.update(kw)
    return ModelConfig.from_dict(base)


def random_batch(cfg: ModelConfig, b: int = 6, seed: int = 0, n_cands: int = 7) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    length = cfg.seq_len
    hist_len = rng.integers(0, length + 1, b)
    hist_len[0], hist_len[1] = length, 0  # a full history and a cold start
    valid = np.arange(length)[None, :] >= (length - hist_len)[:, None]
    prod = np.where(valid, rng.integers(2, cfg.n_products, (b, length)), 0)
    dt = np.where(valid, np.sort(rng.exponential(30.0, (b, length)), axis=1)[:, ::-1], 0.0)
    raw = {
        "hist_product": prod,
        "hist_category": np.where(valid, prod % (cfg.n_categories - 2) + 2, 0),
        "hist_event": np.where(valid, rng.integers(2, cfg.n_event_types, (b, length)), 0),
        "hist_dwell": np.where(valid, rng.integers(1, cfg.n_dwell_buckets, (b, length)), 0),
        "hist_dt": dt.astype(np.float32),
        "hist_len": hist_len,
        "pp_features": rng.random((b, cfg.n_pp_features)).astype(np.float32),
        "target_product": rng.integers(2, cfg.n_products, b),
        "target_products": rng.integers(0, cfg.n_products, (b, 4)),
        "cand_products": np.concatenate([rng.integers(2, cfg.n_products, (b, n_cands - 1)),
                                         np.zeros((b, 1), dtype=np.int64)], axis=1),
        "label_purchase": rng.integers(0, 2, b),
    }
    return batch_to_tensors(raw)


def product_category() -> np.ndarray:
    pc = np.arange(N_PRODUCTS) % (N_CATEGORIES - 2) + 2
    pc[0] = 0
    return pc


def test_shapes_and_finite_losses_including_cold_start():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = StreamRankModel(cfg, product_category=product_category())
    batch = random_batch(cfg)
    out = model(batch)
    b, c = batch["cand_products"].shape
    assert out["state"].shape == (b, cfg.d_model)
    assert out["rank_logits"].shape == (b, c)
    assert out["cand_logit"].shape == (b, c)
    assert out["viewer_logit"].shape == (b,)
    for key in ("loss", "rank_loss", "intent_loss", "cand_loss"):
        assert torch.isfinite(out[key]), key
    assert torch.isfinite(out["state"]).all()  # row 1 is a cold start (hist_len 0)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("loss", ["sampled_softmax", "bce"])
def test_both_ranking_losses_run(loss):
    cfg = small_cfg(loss=loss)
    out = StreamRankModel(cfg)(random_batch(cfg))
    assert torch.isfinite(out["loss"])


def test_causal_future_positions_do_not_change_earlier_outputs():
    cfg = small_cfg()
    torch.manual_seed(1)
    model = StreamRankModel(cfg).eval()
    batch = random_batch(cfg)
    h1, _ = model.encode(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    t = cfg.seq_len - 3  # change positions t.. (the future of every position < t)
    changed["hist_product"][0, t:] = torch.tensor([5, 6, 7])
    changed["hist_event"][0, t:] = 3
    changed["hist_dt"][0, t:] = torch.tensor([0.3, 0.2, 0.1])
    changed["hist_dwell"][0, t:] = 2
    h2, _ = model.encode(changed)
    assert torch.allclose(h1[0, :t], h2[0, :t], atol=1e-6)
    assert not torch.allclose(h1[0, t:], h2[0, t:], atol=1e-4)


def test_time_decay_lowers_attention_to_older_events():
    cfg = small_cfg(n_layers=1)
    torch.manual_seed(2)
    model = StreamRankModel(cfg).eval()
    length = cfg.seq_len
    ages = torch.tensor([[200.0, 150.0, 100.0, 60.0, 30.0, 20.0, 10.0, 5.0, 3.0, 2.0, 1.0, 0.0]])
    batch = batch_to_tensors({
        "hist_product": np.full((1, length), 9), "hist_category": np.full((1, length), 3),
        "hist_event": np.full((1, length), 4), "hist_dwell": np.full((1, length), 2),
        "hist_dt": ages.numpy(), "hist_len": np.array([length]), "pp_features": np.zeros((1, 8), np.float32),
    })
    block = model.blocks[0]
    with torch.no_grad():
        block.decay_raw.fill_(-30.0)  # lambda ~ 0: no decay
        _, attn_flat = model.encode(batch, return_attn=True)
        lam = 0.05
        block.decay_raw.fill_(softplus_inverse(lam))
        _, attn_decay = model.encode(batch, return_attn=True)
    assert (block.decay_rates() > 0).all()
    last_flat, last_decay = attn_flat[0][0, :, -1], attn_decay[0][0, :, -1]  # [H, L] from the newest event
    # Decay moves attention mass from old to recent events ...
    assert (last_decay[:, 0] < last_flat[:, 0]).all()
    assert (last_decay[:, -1] > last_flat[:, -1]).all()
    # ... exactly as a multiplicative exp(-lambda * age) weight (log-space bias).
    log_ratio = torch.log(last_decay) - torch.log(last_flat)
    expected = -lam * (ages[0] - ages[0, -1])
    centred = log_ratio - log_ratio[:, -1:]
    assert torch.allclose(centred, expected.expand_as(centred), atol=1e-3)


def test_decay_rate_is_per_event_type():
    cfg = small_cfg(n_layers=1)
    model = StreamRankModel(cfg).eval()
    length = cfg.seq_len
    events = np.full((1, length), 4)
    events[0, 0] = 5  # the oldest event has another type
    batch = batch_to_tensors({
        "hist_product": np.full((1, length), 9), "hist_category": np.full((1, length), 3),
        "hist_event": events, "hist_dwell": np.full((1, length), 2),
        "hist_dt": np.linspace(100, 0, length, dtype=np.float32)[None], "hist_len": np.array([length]),
        "pp_features": np.zeros((1, 8), np.float32),
    })
    with torch.no_grad():
        model.blocks[0].decay_raw.fill_(softplus_inverse(0.01))
        _, slow = model.encode(batch, return_attn=True)
        model.blocks[0].decay_raw[:, 5] = softplus_inverse(0.2)  # type 5 decays fast
        _, fast = model.encode(batch, return_attn=True)
    assert (fast[0][0, :, -1, 0] < slow[0][0, :, -1, 0]).all()


def test_factorised_scoring_equals_full_forward():
    cfg = small_cfg(intent_chunk=3)
    torch.manual_seed(3)
    model = StreamRankModel(cfg, product_category=product_category()).eval()
    batch = random_batch(cfg, b=5, n_cands=8)
    with torch.no_grad():
        full = model(batch, compute_loss=False)
        state = model.viewer_state(batch)
        all_ids = torch.arange(cfg.n_products)
        scores = model.rank_scores(state, model.candidate_matrix(all_ids))
        probs, intent = model.intent(batch, batch["cand_products"])
    assert scores.shape == (5, cfg.n_products)
    assert torch.allclose(torch.gather(scores, 1, batch["cand_products"]), full["rank_logits"], atol=1e-5)
    assert torch.allclose(state, full["state"], atol=1e-6)
    assert torch.allclose(probs, torch.sigmoid(full["cand_logit"]), atol=1e-6)
    assert torch.allclose(intent, torch.sigmoid(full["viewer_logit"]), atol=1e-6)
    assert ((probs >= 0) & (probs <= 1)).all() and ((intent >= 0) & (intent <= 1)).all()

    # A shared candidate set [N] equals the same set given per viewer [B, N]; chunking is exact.
    shared = torch.arange(2, 40)
    p1, v1 = model.intent(batch, shared)
    p2, v2 = model.intent(batch, shared.expand(5, -1))
    model.cfg.intent_chunk = 1000
    p3, v3 = model.intent(batch, shared, hidden=model.encode(batch)[0])
    assert p1.shape == (5, 38)
    assert torch.allclose(p1, p2, atol=1e-6) and torch.allclose(v1, v2, atol=1e-6)
    assert torch.allclose(p1, p3, atol=1e-6) and torch.allclose(v1, v3, atol=1e-6)


def test_deterministic_for_a_seed():
    cfg = small_cfg(dropout=0.1)

    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(11)
        model = StreamRankModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(3):
            loss = model(random_batch(cfg, seed=step))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.product_emb.weight.detach().clone()

    l1, w1 = run()
    l2, w2 = run()
    assert l1 == l2
    assert torch.equal(w1, w2)


def test_learns_next_product_pattern_to_high_ndcg():
    """next product = perm[last product]: the model must find it in a few seconds of CPU."""
    n_products, length = 40, 8
    cfg = ModelConfig(n_products=n_products, n_categories=4, n_event_types=4, seq_len=length, d_model=32,
                      n_heads=2, n_layers=1, dropout=0.0, num_negatives=30, intent_weight=0.1, cand_weight=0.1)
    rng = np.random.default_rng(0)
    perm = np.concatenate([[0, 1], rng.permutation(np.arange(2, n_products))])

    def make(b: int) -> dict[str, torch.Tensor]:
        hist_len = rng.integers(1, length + 1, b)
        prod = np.zeros((b, length), dtype=np.int64)
        for i in range(b):
            p = rng.integers(2, n_products)
            for t in range(length - hist_len[i], length):
                prod[i, t] = p
                p = perm[p]
        valid = prod > 0
        return batch_to_tensors({
            "hist_product": prod, "hist_category": np.where(valid, 2, 0), "hist_event": np.where(valid, 2, 0),
            "hist_dwell": np.where(valid, 1, 0), "hist_dt": np.where(valid, 1.0, 0.0).astype(np.float32),
            "hist_len": hist_len, "pp_features": np.zeros((b, 8), np.float32),
            "target_product": perm[prod[:, -1]], "target_products": perm[prod[:, -1]][:, None],
            "cand_products": rng.integers(2, n_products, (b, 5)), "label_purchase": rng.integers(0, 2, b),
        })

    torch.manual_seed(0)
    model = StreamRankModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for _ in range(150):
        loss = model(make(128))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    test = make(500)
    with torch.no_grad():
        ids = torch.arange(2, n_products)
        scores = model.rank_scores(model.viewer_state(test), model.candidate_matrix(ids))
    target_score = torch.gather(scores, 1, (test["target_product"] - 2).unsqueeze(1))
    rank = (scores > target_score).sum(1) + (scores == target_score).sum(1) - 1
    ndcg = torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(())).mean().item()
    assert ndcg > 0.9, f"NDCG@10 {ndcg:.3f} after {train_s:.1f}s"


def with_context(batch: dict[str, torch.Tensor], n_hosts: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The batch plus random stream context (host, hour) on real history events and candidates."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    hist_real = batch["hist_product"] > 0
    cand_real = batch["cand_products"] > 0
    out["hist_host"] = torch.randint(1, n_hosts, batch["hist_product"].shape, generator=g) * hist_real
    out["hist_hour"] = torch.randint(2, 26, batch["hist_product"].shape, generator=g) * hist_real
    out["cand_host"] = torch.randint(1, n_hosts, batch["cand_products"].shape, generator=g) * cand_real
    out["cand_hour"] = torch.randint(2, 26, batch["cand_products"].shape, generator=g) * cand_real
    return out


def test_stream_context_enters_scores_consistently():
    """Candidate scores carry the slot context; the factorised path and the target's own score agree."""
    cfg = small_cfg(n_hosts=9)
    torch.manual_seed(5)
    model = StreamRankModel(cfg, product_category=product_category()).eval()
    batch = with_context(random_batch(cfg, b=5, n_cands=8), cfg.n_hosts)
    batch["cand_products"][:, 2] = batch["target_product"]  # the target is a candidate at position 2
    with torch.no_grad():
        full = model(batch, compute_loss=False)
        state = full["state"]
        ids, host, hour = (batch[k].reshape(-1) for k in ("cand_products", "cand_host", "cand_hour"))
        factorised = (model.rank_scores(state, model.candidate_matrix(ids, host, hour))
                      .reshape(5, 5, 8).diagonal(dim1=0, dim2=1).T)
        assert torch.allclose(factorised, full["rank_logits"], atol=1e-5)
        assert torch.allclose(model.target_scores(state, batch), full["rank_logits"][:, 2], atol=1e-5)
        probs, _ = model.intent(batch, batch["cand_products"], cand_host=batch["cand_host"], cand_hour=batch["cand_hour"])
        assert torch.allclose(probs, torch.sigmoid(full["cand_logit"]), atol=1e-6)
        other = dict(batch, cand_host=batch["cand_host"] % (cfg.n_hosts - 2) + 2)  # other hosts, same products
        assert not torch.allclose(model(other, compute_loss=False)["rank_logits"], full["rank_logits"])
        # A model without context (n_hosts 0: older models) ignores the context inputs entirely.
        plain = StreamRankModel(small_cfg(), product_category=product_category()).eval()
        bare = {k: v for k, v in batch.items() if k not in ("hist_host", "hist_hour", "cand_host", "cand_hour")}
        assert torch.equal(plain(batch, compute_loss=False)["rank_logits"], plain(bare, compute_loss=False)["rank_logits"])


@pytest.mark.parametrize("n_hosts", [0, 9])
def test_inference_encode_equals_the_module_by_module_encode(n_hosts):
    """Without autograd, encode sums the embeddings in one embedding_bag and carries the mask
    in the key ages; it must give the training path's outputs, cold starts included."""
    cfg = small_cfg(n_hosts=n_hosts)
    torch.manual_seed(7)
    model = StreamRankModel(cfg, product_category=product_category()).eval()
    with torch.no_grad():  # trained-looking rates: one type decays fast, one barely at all
        for block in model.blocks:
            block.decay_raw[:, 3] = softplus_inverse(2.0)
            block.decay_raw[:, 4] = -200.0  # softplus underflows to 0: -0 * inf would be NaN
    batch = random_batch(cfg, b=8, seed=4)
    batch["hist_event"][batch["hist_product"] > 0] = torch.tensor([3, 4])[batch["hist_product"][batch["hist_product"] > 0] % 2]
    if n_hosts:
        batch = with_context(batch, n_hosts)
    with torch.enable_grad():
        modules, attn_modules = model.encode(batch, return_attn=True)
    with torch.no_grad():
        fused, attn_fused = model.encode(batch, return_attn=True)
        plain, _ = model.encode(batch)
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused, modules.detach(), atol=1e-5, rtol=0)
    assert torch.allclose(plain, fused, atol=1e-5, rtol=0)  # SDPA and the explicit softmax agree
    for a, b in zip(attn_fused, attn_modules, strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-6, rtol=0)
        assert torch.equal(a == 0, b.detach() == 0)  # the same keys are masked out
    # the training path still gets finite gradients for every decay rate through the mask
    model.train()
    out = model(batch)
    out["loss"].backward()
    for block in model.blocks:
        assert torch.isfinite(block.decay_raw.grad).all()


def test_intent_from_precomputed_candidate_vectors_is_the_same():
    """The scorer hands the intent head its nightly candidate vectors (gathered per viewer)
    instead of ids; chunk by chunk the result must be the per-pair computation's, bit for bit."""
    cfg = small_cfg(n_hosts=9, intent_chunk=3)
    torch.manual_seed(8)
    model = StreamRankModel(cfg, product_category=product_category()).eval()
    batch = with_context(random_batch(cfg, b=6, n_cands=8), cfg.n_hosts)
    ids, host, hour = batch["cand_products"], batch["cand_host"], batch["cand_hour"]
    with torch.no_grad():
        h, _ = model.encode(batch)
        by_ids = model._intent_from_encoded(h, batch, ids, host, hour)
        by_vecs = model._intent_from_encoded(h, batch, ids, host, hour, cand_vecs=model.cand_vec(ids, host, hour))
        wrong = model._intent_from_encoded(h, batch, ids, host, hour, cand_vecs=model.cand_vec(ids.roll(1, dims=1), host, hour))
    assert torch.equal(by_ids[0], by_vecs[0]) and torch.equal(by_ids[1], by_vecs[1])
    assert not torch.allclose(by_ids[0], wrong[0])  # the vectors, not the ids, decide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intent_from_a_nightly_candidate_table_is_the_same(dtype):
    """The scorer computes candidate vectors and target-attention queries once per night and
    gathers them per (viewer, candidate): the logits must be the per-pair computation's, bit
    for bit, in the scorer's bf16 as in float32."""
    cfg = small_cfg(n_hosts=9, intent_chunk=3)
    torch.manual_seed(9)
    model = StreamRankModel(cfg, product_category=product_category()).eval().to(dtype)
    batch = with_context(random_batch(cfg, b=6, n_cands=8), cfg.n_hosts)
    gen = torch.Generator().manual_seed(3)
    t_ids = torch.randint(FIRST_REAL_ID, cfg.n_products, (10,), generator=gen)
    t_host = torch.randint(FIRST_REAL_ID, cfg.n_hosts, (10,), generator=gen)
    t_hour = torch.randint(FIRST_REAL_ID, 26, (10,), generator=gen)
    idx = torch.randint(0, 10, (6, 8), generator=gen)  # each viewer's top candidates, as table rows
    with torch.no_grad():
        h, _ = model.encode(batch)
        vecs = model.candidate_matrix(t_ids, t_host, t_hour)
        queries = model.candidate_queries(vecs)
        by_ids = model._intent_from_encoded(h, batch, t_ids[idx], t_host[idx], t_hour[idx])
        by_table = model._intent_from_encoded(h, batch, t_ids[idx], t_host[idx], t_hour[idx], cand_vecs=vecs[idx],
                                              cand_queries=(queries[0][idx], queries[1][idx]))
        shifted = model._intent_from_encoded(h, batch, t_ids[idx], t_host[idx], t_hour[idx], cand_vecs=vecs[idx],
                                             cand_queries=(queries[0][idx.roll(1, dims=1)], queries[1][idx]))
    assert by_ids[0].dtype == dtype
    assert torch.equal(by_ids[0], by_table[0]) and torch.equal(by_ids[1], by_table[1])
    assert not torch.equal(by_ids[0], shifted[0])  # the gathered queries are what the head uses


def test_learns_which_host_a_viewer_buys_from():
    """The bought candidate is the one shown by the viewer's host: only stream context can tell.

    Products are random and every history event is on the viewer's host, so the product ids
    carry no signal; with n_hosts > 0 the candidate softmax must learn host affinity.
    """
    n_products, n_hosts, length, n_cands = 50, 12, 6, 8
    rng = np.random.default_rng(1)

    def make(b: int) -> dict[str, torch.Tensor]:
        fav = rng.integers(2, n_hosts, b)
        prod = rng.integers(2, n_products, (b, length))
        hosts = (fav[:, None] + rng.integers(1, n_hosts - 2, (b, n_cands)) - 2) % (n_hosts - 2) + 2  # never fav
        hit = rng.integers(0, n_cands, b)
        hosts[np.arange(b), hit] = fav
        cands = rng.integers(2, n_products, (b, n_cands))
        return batch_to_tensors({
            "hist_product": prod, "hist_category": np.full((b, length), 2), "hist_event": np.full((b, length), 2),
            "hist_dwell": np.ones((b, length)), "hist_dt": np.ones((b, length), np.float32),
            "hist_len": np.full(b, length), "pp_features": np.zeros((b, 8), np.float32),
            "target_product": cands[np.arange(b), hit], "target_products": cands[np.arange(b), hit][:, None],
            "cand_products": cands, "label_purchase": np.ones(b), "hist_host": np.repeat(fav[:, None], length, 1),
            "hist_hour": np.full((b, length), 10), "cand_host": hosts, "cand_hour": np.full((b, n_cands), 10),
        })

    def hit_rate(cfg: ModelConfig) -> float:
        torch.manual_seed(0)
        model = StreamRankModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(120):
            loss = model(make(128))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        test = make(400)
        with torch.no_grad():
            model.eval()
            scores = model(test, compute_loss=False)["rank_logits"]
        return (scores.argmax(1) == (test["cand_products"] == test["target_product"][:, None]).float().argmax(1)).float().mean().item()

    base = dict(n_products=n_products, n_categories=4, n_event_types=4, seq_len=length, d_model=16, n_heads=2,
                n_layers=1, dropout=0.0, num_negatives=20, intent_weight=0.1, cand_weight=0.1)
    with_ctx = hit_rate(ModelConfig(**base, n_hosts=n_hosts))
    without = hit_rate(ModelConfig(**base))
    assert with_ctx > 0.9, with_ctx
    assert without < 0.4, without  # chance is 1/8 (the products repeat little within 120 batches)


def test_config_from_dict_ignores_unknown_keys_and_validates():
    cfg = ModelConfig.from_dict({"n_products": 10, "n_categories": 3, "n_event_types": 4, "d_model": 8,
                                 "n_heads": 2, "batch_size": 512, "vocab_path": "x.json"})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"n_products": 10, "n_categories": 3, "n_event_types": 4, "d_model": 10, "n_heads": 3})
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"n_products": 10, "n_categories": 3, "n_event_types": 4, "loss": "hinge"})


def test_state_dict_round_trip_keeps_product_lookups(tmp_path):
    from streamrank.model import load_model

    cfg = small_cfg()
    model = StreamRankModel(cfg, product_category=product_category(), product_price_tier=np.arange(N_PRODUCTS) % 5)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_model(str(tmp_path / "model.pt"), cfg.to_dict())
    assert torch.equal(loaded.product_category, model.product_category)
    assert torch.equal(loaded.product_price_tier, model.product_price_tier)
    batch = random_batch(cfg)
    model.eval()
    assert torch.allclose(loaded.viewer_state(batch), model.viewer_state(batch))


def test_dwell_buckets():
    # Same definition as the feature stage: <100 ms or missing -> 1, then 2 + floor(log2(ms / 100)).
    b = dwell_bucket(np.array([np.nan, -1, 0, 99, 100, 199, 200, 1500, 10_000_000]), n_buckets=16)
    assert b.tolist() == [1, 1, 1, 1, 2, 2, 3, 5, 15]


def test_platt_fit_and_calibration():
    rng = np.random.default_rng(0)
    z = rng.normal(size=20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(2.0 * z - 1.0)))).astype(int)
    cal = fit_platt(z, y)
    assert abs(cal["a"] - 2.0) < 0.15 and abs(cal["b"] + 1.0) < 0.1
    assert fit_platt(z, np.zeros_like(y)) is None
    p = np.array([0.1, 0.5, 0.9])
    platt = apply_calibration(p, {"method": "platt", "a": 1.0, "b": 0.0})
    assert np.allclose(platt, p)
    iso = apply_calibration(p, {"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.0, 0.2, 0.4]})
    assert np.allclose(iso, [0.04, 0.2, 0.36])
    assert math.isclose(float(apply_calibration(np.array([0.3]), None)[0]), 0.3)
