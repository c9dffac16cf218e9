"""The streamrank attention model (DESIGN.md section 7).

One encoder, two heads:

* **Encoder** - SASRec-style stack of pre-LN causal multi-head self-attention blocks over the
  viewer's last ``seq_len`` events. Each event is embedded as product + category (+ price tier)
  + event type + dwell bucket + time-gap bucket + position. Attention logits carry a learned
  time-decay bias ``-lambda_{type_j} * age_j`` (the log of an ``exp(-lambda * dt)`` weight),
  ``lambda = softplus(raw) > 0`` per head and per event type of the *key* event, so e.g. a
  purchase can stay relevant for days while a view fades within hours.
* **Stream context** (``n_hosts > 0``) - what a viewer buys depends on which streams they
  watch: their favourite hosts and the hours they are online. Every history event adds the
  embeddings of its stream's host and its UTC hour of day; every candidate adds those of the
  slot that will show it tomorrow (``cand_vec = item_vec + context_vec``). A model with
  ``n_hosts = 0`` (older models, the leave-one-out benchmark) has no context and ignores
  the context inputs.
* **Ranking head** - viewer state = encoder output at the last position (the most recent event;
  histories are left-padded). Score of product p = ``state . item_vec(p)`` where the item tower
  ``item_vec`` shares the input embeddings. Trained with sampled softmax (or BCE) against
  ``num_negatives`` uniformly sampled products, at every history position (next event) and at
  the last position (next cart/buy after the cutoff). A candidate is scored with its slot
  context, ``state . cand_vec(p, host, hour)``; a softmax over each row's candidates
  (``cand_rank_weight``) teaches the context terms, which the context-free sampled negatives
  cannot.
* **Intent head** - DIN-style target attention: each candidate product attends over the encoder
  outputs (with its own per-type time decay relative to the cutoff, plus a learned "null" slot
  so cold-start viewers are well defined), combined with the viewer state and purchase-power
  features into a per-candidate logit (BCE: was the candidate carted/bought tomorrow). The
  per-candidate logits plus a candidate-free background logit are pooled into the viewer-level
  P(purchase tomorrow) (BCE on ``label_purchase``).

Scoring is factorised: ``viewer_state`` once per viewer, ``candidate_matrix`` once per night,
``rank_scores`` is one matmul; ``intent`` chunks over candidates so a few thousand fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_ID = 0
UNK_ID = 1
FIRST_REAL_ID = 2

# intent(): (viewer, candidate) pairs per chunk, ~80 MB of float32 activations at d_model 64.
MAX_PAIRS_PER_CHUNK = 65536

# Upper end of the time-gap buckets: gaps beyond 60 days share the last bucket.
DT_MAX_HOURS = 24.0 * 60.0

#: Hour-of-day tokens: 0 padding, 1 unknown, 2 + UTC hour (features.hour_token).
N_HOUR_TOKENS = 26

BATCH_INT_KEYS = (
    "hist_product", "hist_category", "hist_event", "hist_dwell", "hist_len",
    "target_product", "target_products", "cand_products", "label_purchase",
    "hist_host", "hist_hour", "cand_host", "cand_hour",
)
#: Stream-context inputs; a batch without them (or a model with n_hosts = 0) has no context.
CONTEXT_KEYS = ("hist_host", "hist_hour", "cand_host", "cand_hour")
BATCH_FLOAT_KEYS = ("hist_dt", "pp_features")


@dataclass
class ModelConfig:
    """Hyper-parameters and vocabulary sizes; everything needed to rebuild the module."""

    n_products: int
    n_categories: int
    n_event_types: int
    n_dwell_buckets: int = 16
    n_dt_buckets: int = 32
    n_price_tiers: int = 8
    seq_len: int = 50
    n_pp_features: int = 8
    n_hosts: int = 0  # host vocabulary size; 0 = no stream context (models before it, the LOO benchmark)
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.1
    num_negatives: int = 100
    loss: str = "sampled_softmax"  # or "bce"
    seq_loss_weight: float = 1.0  # next-event loss at every history position (SASRec)
    intent_weight: float = 1.0  # viewer-level BCE on label_purchase
    cand_weight: float = 0.5  # per-candidate BCE (candidate in target_products)
    cand_rank_weight: float = 5.0  # softmax of target_product over the row's candidates (with context)
    intent_pool: str = "attention"  # or "logsumexp"
    decay_init: float = 0.01  # initial lambda, per hour (half-life ~ 70 h)
    intent_chunk: int = 256  # candidates per chunk in intent()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict, ignoring unknown keys (conf sections carry more than the model)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_products < 3:
            raise ValueError("n_products must include padding (0), unknown (1) and >= 1 real id")
        if self.loss not in ("sampled_softmax", "bce"):
            raise ValueError(f"model.loss must be sampled_softmax or bce, got {self.loss!r}")
        if self.intent_pool not in ("attention", "logsumexp"):
            raise ValueError(f"model.intent_pool must be attention or logsumexp, got {self.intent_pool!r}")


def dwell_bucket(dwell_ms: np.ndarray, n_buckets: int = 16) -> np.ndarray:
    """Dwell bucket of real events, identical to the feature stage (features.dwell_bucket).

    1 for dwell < 100 ms or missing (likes, clicks, carts carry none), else
    ``2 + floor(log2(ms / 100))`` capped at ``n_buckets - 1`` (15: >= ~13.7 min). 0 is reserved
    for padding and never returned here. The pyfunc calls this on raw ``hist_dwell_ms`` so
    serving sees exactly the buckets training saw.
    """
    ms = np.asarray(dwell_ms, dtype=np.float64)
    out = np.ones(ms.shape, dtype=np.int32)
    big = np.isfinite(ms) & (ms >= 100.0)
    out[big] = np.minimum(n_buckets - 1, 2 + np.floor(np.log2(ms[big] / 100.0))).astype(np.int32)
    return out


def softplus_inverse(y: float) -> float:
    return float(math.log(math.expm1(y)))


def batch_to_tensors(batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Convert a dict of arrays/tensors to the model's dtypes (ids int64, reals float32)."""
    out: dict[str, Tensor] = {}
    for k, v in batch.items():
        if k in BATCH_INT_KEYS:
            out[k] = torch.as_tensor(v).to(device=device, dtype=torch.long, non_blocking=True)
        elif k in BATCH_FLOAT_KEYS:
            out[k] = torch.as_tensor(v).to(device=device, dtype=torch.float32, non_blocking=True)
    return out


def target_positions(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Index of target_product among cand_products [B] and whether it is there at all [B]."""
    cands, tgt = batch["cand_products"], batch["target_product"]
    hit = (cands == tgt.unsqueeze(1)) & (tgt.unsqueeze(1) >= FIRST_REAL_ID)
    return hit.float().argmax(dim=1), hit.any(dim=1)


class DecayAttentionBlock(nn.Module):
    """Pre-LN causal self-attention + feed-forward, with a per-type time-decay bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads = h
        self.d_head = d // h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        # Dropout on the residual branches only (not inside the FF): CPU dropout masks are costly.
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        # raw lambda per head and per key event type; softplus keeps the decay rate positive.
        self.decay_raw = nn.Parameter(torch.full((h, cfg.n_event_types), softplus_inverse(cfg.decay_init)))

    def decay_rates(self) -> Tensor:
        """lambda[h, event_type] > 0, per hour."""
        return F.softplus(self.decay_raw)

    def attn_bias(self, age: Tensor, event: Tensor, allowed: Tensor | None) -> Tensor:
        """Additive attention bias [B, H, L, L]: time decay where allowed, -inf elsewhere.

        ``age`` [B, Lq, Lk] is shared by every block: only the rates differ. Without autograd
        it is `masked_key_ages` (+inf where not allowed) and ``allowed`` is None, so the bias
        needs no copy-and-fill of a [B, H, L, L] tensor per block (``-lambda * inf = -inf``;
        the rates are floored at the dtype's smallest normal number, so never ``0 * inf``).
        With autograd it is `key_ages` and ``allowed`` masks it, keeping the infinity out of
        the rates' gradients. The bias is built in age's dtype, the activations' (bf16 when
        scoring in bf16), so no [B, H, L, L] tensor is converted afterwards.
        """
        # A lookup, not rates[:, event]: the backward of advanced indexing accumulates B*L
        # gradients into a dozen rates with a sort-based index_put (half the GPU time of a step).
        lam = F.embedding(event, self.decay_rates().t()).to(age.dtype)  # [B, L, H] rates of the key events
        # contiguous: multiplied by a permuted view (keys strided by H) the broadcast below
        # does not vectorise and took 13x longer (17 ms against 1.3 ms per block of 1,024 viewers)
        lam = lam.clamp_min(torch.finfo(age.dtype).tiny).permute(0, 2, 1).contiguous().unsqueeze(2)  # [B, H, 1, L]
        bias = -lam * age.unsqueeze(1)  # [B, H, Lq, Lk]
        return bias if allowed is None else bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))

    @staticmethod
    def key_ages(dt: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, Lq, Lk] hours between query i and an earlier key j: ``dt_j - dt_i`` clamped at 0.

        Both are measured back from the cutoff, so the difference is the time between the two
        events. For the last position - the viewer state - this is the age relative to the
        most recent event; its difference to the cutoff-relative form ``-lambda * dt_j`` is
        absorbed per key type into the learned lambdas, and it keeps training at every
        position consistent with scoring. Computed in float32, then cast once.
        """
        return (dt.unsqueeze(1) - dt.unsqueeze(2)).clamp_min(0.0).to(dtype)

    @staticmethod
    def masked_key_ages(dt: Tensor, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """`key_ages` with +inf where a query may not attend (``allowed`` [B, Lq, Lk] False).

        Masked once per encode on [B, L, L] rather than once per block on [B, H, L, L].
        """
        return DecayAttentionBlock.key_ages(dt, dtype).masked_fill_(~allowed, float("inf"))

    def forward(self, x: Tensor, bias: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        b, length, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(b, length, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        attn_w = None
        bias = bias.to(q.dtype)
        if return_attn:
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head) + bias
            attn_w = torch.softmax(logits.float(), dim=-1).to(q.dtype)
            ctx = F.dropout(attn_w, self.attn_dropout, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0
            )
        ctx = ctx.transpose(1, 2).reshape(b, length, d)
        x = x + self.drop(self.out(ctx))
        x = x + self.drop(self.ff(self.ln2(x)))
        return x, attn_w


class StreamRankModel(nn.Module):
    """Sequence encoder + next-product ranking head + DIN intent head (see module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        product_category: np.ndarray | None = None,
        product_price_tier: np.ndarray | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.product_emb = nn.Embedding(cfg.n_products, d, padding_idx=PAD_ID)
        self.category_emb = nn.Embedding(cfg.n_categories, d, padding_idx=PAD_ID)
        self.tier_emb = nn.Embedding(cfg.n_price_tiers, d, padding_idx=PAD_ID)
        self.event_emb = nn.Embedding(cfg.n_event_types, d, padding_idx=PAD_ID)
        self.dwell_emb = nn.Embedding(cfg.n_dwell_buckets, d, padding_idx=PAD_ID)
        self.dt_emb = nn.Embedding(cfg.n_dt_buckets, d, padding_idx=PAD_ID)
        self.pos_emb = nn.Embedding(cfg.seq_len, d)
        if cfg.n_hosts > 0:
            self.host_emb = nn.Embedding(cfg.n_hosts, d, padding_idx=PAD_ID)
            self.hour_emb = nn.Embedding(N_HOUR_TOKENS, d, padding_idx=PAD_ID)
        self.in_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([DecayAttentionBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_ln = nn.LayerNorm(d)

        # Intent head (DIN target attention over the encoder outputs).
        self.din_q = nn.Linear(d, d)
        self.din_k = nn.Linear(d, d)
        self.din_v = nn.Linear(d, d)
        self.din_null_k = nn.Parameter(torch.zeros(d))
        self.din_null_v = nn.Parameter(torch.zeros(d))
        self.din_decay_raw = nn.Parameter(torch.full((cfg.n_event_types,), softplus_inverse(cfg.decay_init)))
        self.pp_proj = nn.Linear(cfg.n_pp_features, d)
        self.cand_in = nn.Linear(3 * d, d)  # [e_c, u_c, e_c * u_c]
        self.viewer_in = nn.Linear(2 * d, d)  # [state, pp]; shared by every candidate of a viewer
        self.cand_out = nn.Linear(d, 1)
        self.bg_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.pool_scale = nn.Parameter(torch.ones(()))
        self.pool_bias = nn.Parameter(torch.zeros(()))

        # Lookup tables travel inside the state_dict so model.pt is self-contained.
        cat = np.full(cfg.n_products, UNK_ID, dtype=np.int64)
        cat[PAD_ID] = PAD_ID
        if product_category is not None:
            pc = np.asarray(product_category, dtype=np.int64)
            if pc.shape[0] != cfg.n_products:
                raise ValueError(f"product_category has {pc.shape[0]} entries, n_products={cfg.n_products}")
            cat = np.clip(pc, 0, cfg.n_categories - 1)
        tier = np.zeros(cfg.n_products, dtype=np.int64)
        if product_price_tier is not None:
            pt = np.asarray(product_price_tier, dtype=np.int64)
            if pt.shape[0] != cfg.n_products:
                raise ValueError(f"product_price_tier has {pt.shape[0]} entries, n_products={cfg.n_products}")
            tier = np.clip(pt, 0, cfg.n_price_tiers - 1)
        self.register_buffer("product_category", torch.as_tensor(cat), persistent=True)
        self.register_buffer("product_price_tier", torch.as_tensor(tier), persistent=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.05)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ towers
    def item_vec(self, product_ids: Tensor, category_ids: Tensor | None = None) -> Tensor:
        """Item tower shared by inputs and outputs: product + category + price tier embeddings."""
        p = product_ids.clamp(0, self.cfg.n_products - 1)
        c = self.product_category[p] if category_ids is None else category_ids.clamp(0, self.cfg.n_categories - 1)
        return self.product_emb(p) + self.category_emb(c) + self.tier_emb(self.product_price_tier[p])

    @property
    def has_context(self) -> bool:
        return self.cfg.n_hosts > 0

    def context_vec(self, host: Tensor | None, hour: Tensor | None) -> Tensor | None:
        """Host + hour-of-day embedding of a stream slot, or None without context (0 ids are padding)."""
        if not self.has_context or host is None or hour is None:
            return None
        return self.host_emb(host.clamp(0, self.cfg.n_hosts - 1)) + self.hour_emb(hour.clamp(0, N_HOUR_TOKENS - 1))

    def cand_vec(self, product_ids: Tensor, host: Tensor | None = None, hour: Tensor | None = None) -> Tensor:
        """Candidate tower: the item vector plus the context of the slot that shows it."""
        v = self.item_vec(product_ids)
        ctx = self.context_vec(host, hour)
        return v if ctx is None else v + ctx

    def target_context(self, batch: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Host and hour of ``target_product``'s slot, read from its position among the candidates.

        A target outside the candidates (not on the schedule) gets padding: no context.
        """
        if not self.has_context or "cand_host" not in batch:
            return None, None
        pos, found = target_positions(batch)
        host = batch["cand_host"].gather(1, pos.unsqueeze(1)).squeeze(1) * found
        hour = batch["cand_hour"].gather(1, pos.unsqueeze(1)).squeeze(1) * found
        return host, hour

    def target_scores(self, state: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """[B] score of each row's target_product as a candidate (with its slot context)."""
        host, hour = self.target_context(batch)
        return (state * self.cand_vec(batch["target_product"], host, hour)).sum(-1)

    def candidate_scores(self, state: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """[B, C] scores of each row's cand_products (with their slot context)."""
        return torch.einsum("bd,bnd->bn", state, self.cand_vec(
            batch["cand_products"], batch.get("cand_host"), batch.get("cand_hour")))

    def dt_bucket(self, dt: Tensor, valid: Tensor) -> Tensor:
        """Log-spaced time-gap buckets: 1 .. n_dt_buckets-1 for real events, 0 for padding."""
        n = self.cfg.n_dt_buckets
        scaled = torch.log1p(dt.clamp_min(0.0)) * ((n - 2) / math.log1p(DT_MAX_HOURS))
        b = 1 + scaled.floor().clamp(0, n - 2).long()
        return torch.where(valid, b, torch.zeros_like(b))

    def valid_mask(self, batch: Mapping[str, Tensor]) -> Tensor:
        """[B, L] True at real events: the last ``hist_len`` positions (left padding)."""
        length = batch["hist_product"].shape[1]
        pos = torch.arange(length, device=batch["hist_product"].device)
        hist_len = batch["hist_len"].clamp(0, length)
        return pos.unsqueeze(0) >= (length - hist_len).unsqueeze(1)

    def encode(self, batch: Mapping[str, Tensor], return_attn: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Encoder outputs [B, L, D] (after the final LayerNorm) and, optionally, attention maps.

        Without autograd (validation, evaluate, the pyfunc, scoring) the event embeddings are
        one `F.embedding_bag` over the concatenated tables and the attention mask rides in
        the key ages: the same sums, reassociated, in a fraction of the time (the nine
        lookups and eight [B, L, D] adds were ~14 % of a scoring batch). With autograd the
        modules are used one by one, which keeps padding rows out of the gradients and the
        mask out of the decay rates' gradients (``-lambda * inf`` has no derivative).
        """
        cfg = self.cfg
        prod = batch["hist_product"]
        length = prod.shape[1]
        if length > cfg.seq_len:
            raise ValueError(f"history length {length} exceeds model seq_len {cfg.seq_len}")
        valid = self.valid_mask(batch)
        dt = torch.nan_to_num(batch["hist_dt"].float(), nan=0.0, posinf=DT_MAX_HOURS).masked_fill(~valid, 0.0)
        event = batch["hist_event"].clamp(0, cfg.n_event_types - 1) * valid
        dwell = batch["hist_dwell"].clamp(0, cfg.n_dwell_buckets - 1) * valid
        pos = torch.arange(cfg.seq_len - length, cfg.seq_len, device=prod.device)
        host = batch["hist_host"] * valid if "hist_host" in batch else None
        hour = batch["hist_hour"] * valid if "hist_hour" in batch else None
        grad = torch.is_grad_enabled()
        if grad:
            x = (
                self.item_vec(prod * valid, batch["hist_category"] * valid)
                + self.event_emb(event)
                + self.dwell_emb(dwell)
                + self.dt_emb(self.dt_bucket(dt, valid))
                + self.pos_emb(pos).unsqueeze(0)
            )
            ctx = self.context_vec(host, hour)
            if ctx is not None:
                x = x + ctx
        else:
            x = self._summed_embeddings(prod * valid, batch["hist_category"] * valid, event, dwell,
                                        self.dt_bucket(dt, valid), pos, host, hour)
        x = self.in_drop(x)
        causal = torch.ones(length, length, dtype=torch.bool, device=prod.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=prod.device)
        # A query sees past real events and always itself, so padded/cold-start rows stay finite.
        allowed = causal.unsqueeze(0) & (valid.unsqueeze(1) | eye.unsqueeze(0))
        attns: list[Tensor] = []
        if grad:
            age, mask = DecayAttentionBlock.key_ages(dt, x.dtype), allowed
        else:
            age, mask = DecayAttentionBlock.masked_key_ages(dt, allowed, x.dtype), None
        for block in self.blocks:
            bias = block.attn_bias(age, event, mask)
            x, a = block(x, bias, return_attn=return_attn)
            if a is not None:
                attns.append(a)
        return self.final_ln(x), attns

    def _summed_embeddings(self, prod: Tensor, category: Tensor, event: Tensor, dwell: Tensor, dt_bucket: Tensor,
                           pos: Tensor, host: Tensor | None, hour: Tensor | None) -> Tensor:
        """[B, L, D] sum of every input embedding of each event, as ONE embedding_bag lookup.

        Equal to the module-by-module sum in `encode` up to float reassociation (the bag
        adds the rows in one pass, in float32 for bf16 tables). The concatenated table is
        rebuilt per call: a copy of the tables (a few MB) costs far less than the lookups
        it replaces, and it can never go stale while training updates the weights.
        """
        cfg = self.cfg
        p = prod.clamp(0, cfg.n_products - 1)
        parts = [
            (self.product_emb.weight, p),
            (self.category_emb.weight, category.clamp(0, cfg.n_categories - 1)),
            (self.tier_emb.weight, self.product_price_tier[p]),
            (self.event_emb.weight, event),
            (self.dwell_emb.weight, dwell),
            (self.dt_emb.weight, dt_bucket),
            (self.pos_emb.weight, pos.unsqueeze(0).expand_as(prod)),
        ]
        if self.has_context and host is not None and hour is not None:
            parts += [(self.host_emb.weight, host.clamp(0, cfg.n_hosts - 1)),
                      (self.hour_emb.weight, hour.clamp(0, N_HOUR_TOKENS - 1))]
        offsets, start = [], 0
        for weight, _ in parts:
            offsets.append(start)
            start += weight.shape[0]
        ids = torch.stack([i for _, i in parts], dim=-1) + torch.tensor(offsets, device=prod.device)
        table = torch.cat([w for w, _ in parts])
        return F.embedding_bag(ids.view(-1, len(parts)), table, mode="sum").view(*prod.shape, -1)

    # ------------------------------------------------------------------ factorised scoring API
    def viewer_state(self, batch: Mapping[str, Tensor]) -> Tensor:
        """[B, D] viewer representation: the encoder output at the most recent event."""
        return self.encode(batch)[0][:, -1]

    def candidate_matrix(self, product_ids: Tensor, host: Tensor | None = None, hour: Tensor | None = None) -> Tensor:
        """[N, D] candidate vectors (with slot context when given); once per night for all candidates."""
        return self.cand_vec(product_ids, host, hour)

    @staticmethod
    def rank_scores(state: Tensor, cand_matrix: Tensor) -> Tensor:
        """[B, N] ranking scores: one matmul of viewer states with the candidate matrix."""
        return state @ cand_matrix.T

    @torch.no_grad()
    def intent(self, batch: Mapping[str, Tensor], cand_ids: Tensor, hidden: Tensor | None = None,
               cand_host: Tensor | None = None, cand_hour: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-candidate purchase probabilities [B, N] and viewer intent P(purchase) [B].

        ``cand_ids`` is [N] (one candidate set for every viewer, e.g. tomorrow's schedule) or
        [B, N] (per viewer, 0 = padding). Work is chunked over candidates so that at most
        ``intent_chunk`` candidates and MAX_PAIRS_PER_CHUNK (viewer, candidate) pairs are live.
        Pass ``hidden = encode(batch)[0]`` to reuse one encoder pass for state and intent
        (``viewer_state == hidden[:, -1]``). ``cand_host``/``cand_hour`` are the candidates' slot
        context, shaped like ``cand_ids``.
        """
        h = self.encode(batch)[0] if hidden is None else hidden
        cand_logit, viewer_logit = self._intent_from_encoded(h, batch, cand_ids, cand_host, cand_hour)
        return torch.sigmoid(cand_logit.float()), torch.sigmoid(viewer_logit.float())

    # ------------------------------------------------------------------ intent internals
    def candidate_queries(self, cand_vecs: Tensor) -> tuple[Tensor, Tensor]:
        """Target-attention queries [..., D] of candidate vectors and their null-slot logits [...].

        Both depend on the candidate alone, row by row, so the scorer computes them once per
        night for every candidate and gathers them per (viewer, candidate) pair: the same
        numbers as computing them per pair (checked bit for bit in the tests), without a
        [pairs, D] x [D, D] product per batch.
        """
        q = self.din_q(cand_vecs)
        return q, (q @ self.din_null_k) * (1.0 / math.sqrt(self.cfg.d_model))

    def _intent_from_encoded(
        self, h: Tensor, batch: Mapping[str, Tensor], cand_ids: Tensor,
        cand_host: Tensor | None = None, cand_hour: Tensor | None = None, cand_vecs: Tensor | None = None,
        cand_queries: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-candidate logits [B, N] and pooled viewer logit [B] from encoder outputs.

        ``cand_vecs`` (shaped like ``cand_ids`` plus D) are the candidates' `cand_vec`s when
        the caller already has them (the scorer gathers its nightly candidate matrix): one
        gather instead of five lookups and four adds per (viewer, candidate) pair.
        ``cand_queries`` are their `candidate_queries`, gathered the same way.
        """
        cfg = self.cfg
        b, _, d = h.shape
        valid = self.valid_mask(batch)
        dt = torch.nan_to_num(batch["hist_dt"].float(), nan=0.0, posinf=DT_MAX_HOURS).masked_fill(~valid, 0.0)
        event = batch["hist_event"].clamp(0, cfg.n_event_types - 1) * valid
        # Cutoff-relative decay for target attention: bias_j = -lambda_{type_j} * dt_j.
        decay = -F.embedding(event, F.softplus(self.din_decay_raw).unsqueeze(1)).squeeze(-1) * dt
        key_bias = decay.masked_fill(~valid, float("-inf"))  # [B, L]
        keys = self.din_k(h)  # [B, L, D]
        values = self.din_v(h)
        state = h[:, -1]
        pp = self.pp_proj(torch.nan_to_num(batch["pp_features"].float()).to(h.dtype))
        viewer_part = self.viewer_in(torch.cat([state, pp], dim=-1))  # [B, D]
        null_logit_scale = 1.0 / math.sqrt(d)

        shared = cand_ids.dim() == 1
        n = cand_ids.shape[-1]
        chunk = max(1, min(int(cfg.intent_chunk), MAX_PAIRS_PER_CHUNK // max(b, 1)))
        logits = []
        for s in range(0, n, chunk):
            ids = cand_ids[..., s:s + chunk]
            if cand_vecs is not None:
                e = cand_vecs[..., s:s + chunk, :].to(h.dtype).contiguous()
            else:
                e = self.cand_vec(ids, None if cand_host is None else cand_host[..., s:s + chunk],
                                  None if cand_hour is None else cand_hour[..., s:s + chunk])  # [n, D] or [B, n, D]
            if cand_queries is not None:
                q, null = cand_queries[0][..., s:s + chunk, :], cand_queries[1][..., s:s + chunk]
            else:
                q, null = self.candidate_queries(e)
            if shared:
                att = torch.einsum("nd,bld->bnl", q, keys) * null_logit_scale
                null = null.unsqueeze(0).expand(b, -1)
            else:
                att = torch.einsum("bnd,bld->bnl", q, keys) * null_logit_scale
            att = att + key_bias.unsqueeze(1).to(att.dtype)
            # dtype=: softmax reads the bf16 logits as float32 itself, no float32 copy of them
            w = torch.softmax(torch.cat([null.unsqueeze(-1), att], dim=-1), dim=-1, dtype=torch.float32).to(values.dtype)
            u = w[..., :1] * self.din_null_v + torch.einsum("bnl,bld->bnd", w[..., 1:], values)
            e_b = e.unsqueeze(0).expand(b, -1, -1) if shared else e
            z = self.cand_in(torch.cat([e_b, u, e_b * u], dim=-1)) + viewer_part.unsqueeze(1)
            logits.append(self.cand_out(F.gelu(z)).squeeze(-1))
        cand_logit = torch.cat(logits, dim=1) if logits else h.new_zeros(b, 0)
        cand_valid = (cand_ids >= FIRST_REAL_ID - 1) if not shared else (cand_ids >= FIRST_REAL_ID - 1).expand(b, -1)
        bg = self.bg_mlp(torch.cat([state, pp], dim=-1))  # [B, 1] purchases outside the candidates
        pool_in = torch.cat([bg, cand_logit.masked_fill(~cand_valid, float("-inf"))], dim=1).float()
        if cfg.intent_pool == "logsumexp":
            pooled = torch.logsumexp(pool_in, dim=1)
        else:
            weights = torch.softmax(pool_in, dim=1)
            pooled = (weights * torch.nan_to_num(pool_in, neginf=0.0)).sum(dim=1)
        viewer_logit = self.pool_scale * pooled + self.pool_bias
        return cand_logit, viewer_logit

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: Mapping[str, Tensor], compute_loss: bool = True) -> dict[str, Tensor]:
        """Full forward on a training batch; with ``compute_loss`` also the losses.

        Everything (negative sampling, losses) happens inside forward so DDP sees one graph.
        Returns ``state`` [B, D], ``rank_logits`` [B, C] for ``cand_products``, ``cand_logit``
        [B, C], ``viewer_logit`` [B] and, with losses, ``loss``, ``rank_loss``, ``intent_loss``,
        ``cand_loss``.
        """
        h, _ = self.encode(batch)
        state = h[:, -1]
        cands = batch["cand_products"]
        rank_logits = self.candidate_scores(state, batch)
        cand_logit, viewer_logit = self._intent_from_encoded(h, batch, cands, batch.get("cand_host"), batch.get("cand_hour"))
        out = {"state": state, "rank_logits": rank_logits, "cand_logit": cand_logit, "viewer_logit": viewer_logit}
        if compute_loss:
            out.update(self._losses(h, batch, rank_logits, cand_logit, viewer_logit))
        return out

    def _ranking_loss(self, hidden: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
        """Mean sampled-softmax (or BCE) loss of targets [M] against shared negatives [K]."""
        if targets.numel() == 0:
            return hidden.sum() * 0.0
        pos = (hidden * self.item_vec(targets)).sum(-1).float()  # [M]
        neg = (hidden @ self.item_vec(negatives).T).float()  # [M, K]
        neg = neg.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
        if self.cfg.loss == "bce":
            neg_term = F.softplus(neg).masked_fill(torch.isinf(neg), 0.0).mean(dim=1)
            return (F.softplus(-pos) + neg_term).mean()
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
        return (torch.logsumexp(logits, dim=1) - pos).mean()

    @staticmethod
    def _candidate_softmax_loss(batch: Mapping[str, Tensor], rank_logits: Tensor) -> Tensor:
        """Cross-entropy of target_product among the row's real candidates (rows where it is one).

        This is the nightly ranking task itself (tomorrow's scheduled products); it is where the
        slot-context embeddings learn, since sampled catalogue negatives carry no slot.
        """
        pos, rows = target_positions(batch)
        if not bool(rows.any()):
            return rank_logits.sum() * 0.0
        logits = rank_logits.float().masked_fill(batch["cand_products"] < FIRST_REAL_ID, float("-inf"))[rows]
        return F.cross_entropy(logits, pos[rows])

    def _losses(
        self, h: Tensor, batch: Mapping[str, Tensor], rank_logits: Tensor, cand_logit: Tensor, viewer_logit: Tensor
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        prod = batch["hist_product"]
        valid = self.valid_mask(batch)
        negatives = torch.randint(FIRST_REAL_ID, cfg.n_products, (cfg.num_negatives,), device=prod.device)

        # Next-event targets inside the history (left padding: if t is real so is t+1).
        seq_tgt = prod[:, 1:]
        seq_mask = valid[:, :-1] & (seq_tgt >= FIRST_REAL_ID)
        seq_loss = self._ranking_loss(h[:, :-1][seq_mask], seq_tgt[seq_mask], negatives)
        # Next cart/buy after the cutoff, from the viewer state (cold-start rows included).
        tgt = batch["target_product"]
        tmask = tgt >= FIRST_REAL_ID
        target_loss = self._ranking_loss(h[:, -1][tmask], tgt[tmask], negatives)
        rank_loss = target_loss + cfg.seq_loss_weight * seq_loss
        if cfg.cand_rank_weight > 0:
            rank_loss = rank_loss + cfg.cand_rank_weight * self._candidate_softmax_loss(batch, rank_logits)

        intent_loss = F.binary_cross_entropy_with_logits(viewer_logit.float(), batch["label_purchase"].float())
        cands = batch["cand_products"]
        cmask = cands >= FIRST_REAL_ID
        tp = batch["target_products"]
        cand_label = ((cands.unsqueeze(2) == tp.unsqueeze(1)) & (tp.unsqueeze(1) >= FIRST_REAL_ID)).any(dim=2)
        if cmask.any():
            cand_loss = F.binary_cross_entropy_with_logits(cand_logit.float()[cmask], cand_label[cmask].float())
        else:
            cand_loss = cand_logit.sum() * 0.0
        loss = rank_loss + cfg.intent_weight * intent_loss + cfg.cand_weight * cand_loss
        return {"loss": loss, "rank_loss": rank_loss.detach(), "intent_loss": intent_loss.detach(),
                "cand_loss": cand_loss.detach()}


def load_model(state_dict_path: str, config: ModelConfig | Mapping[str, Any], map_location: str = "cpu") -> StreamRankModel:
    """Rebuild a model from ``model.pt`` (state_dict incl. lookup buffers) and its config."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    model = StreamRankModel(cfg)
    state = torch.load(state_dict_path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model


# ---------------------------------------------------------------------- calibration
def fit_platt(logits: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iters: int = 50) -> dict[str, Any] | None:
    """Platt scaling ``p = sigmoid(a * logit + b)`` fitted by Newton's method (tiny L2 on a, b).

    Fitted on the validation intent logits so P(purchase tomorrow) matches observed rates;
    returns None when the labels hold a single class (nothing to calibrate against).
    """
    x = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if x.size == 0 or y.min() == y.max():
        return None
    w = np.array([1.0, 0.0])
    X = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    if w[0] < 0:
        # An inverted slope would "fix" an anti-correlated head on the very rows it is fitted on
        # and hide that the model is worse than chance; keep the ranking, calibrate the level only.
        base = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
        w = np.array([0.0, float(np.log(base / (1 - base)))])
    return {"method": "platt", "a": float(w[0]), "b": float(w[1]), "n": int(x.size), "input": "logit"}


def apply_calibration(probs: np.ndarray, calibrator: Mapping[str, Any] | None) -> np.ndarray:
    """Map raw intent probabilities through a Platt (a, b on the logit) or isotonic calibrator.

    Isotonic calibrators give thresholds ``x`` -> ``y`` (also accepted: sklearn's
    ``X_thresholds_``/``y_thresholds_`` names); values between thresholds are interpolated.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    if not calibrator:
        return p
    method = calibrator.get("method") or ("platt" if "a" in calibrator else "isotonic")
    if method == "platt":
        z = np.log(p) - np.log1p(-p)
        return 1.0 / (1.0 + np.exp(-(float(calibrator["a"]) * z + float(calibrator["b"]))))
    if method == "isotonic":
        xs = calibrator.get("x", calibrator.get("x_thresholds", calibrator.get("X_thresholds_")))
        ys = calibrator.get("y", calibrator.get("y_thresholds", calibrator.get("y_thresholds_")))
        if xs is None or ys is None:
            raise ValueError("isotonic calibrator needs x and y thresholds")
        return np.clip(np.interp(p, np.asarray(xs, float), np.asarray(ys, float)), 0.0, 1.0)
    raise ValueError(f"unknown calibrator method {method!r}")
