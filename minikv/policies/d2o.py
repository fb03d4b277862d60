"""D2O, Dynamic Discriminative Operations (Wan et al., arXiv 2406.13035), step by step (train_free.md §6).

Layer level: layers whose prefill attention is more spread out get a larger share of the budget (Steps 1-2).
Token level: H2O eviction per KV head with attention sinks (Step 3); each evicted entry is compared with the kept
ones of its head and, when it is similar enough (an EMA threshold), merged into its nearest kept entry instead of
being dropped (Steps 4-5). Step 6 is the decode step that runs them in order.

    Step 1  F_l = mean_h minmax_h(Var_keys(colsum_h))       head_variances, variance_statistic (after_prefill)
    Step 2  w = softmax(-F), r_l = clamp(L w_l rho, 0.01, 1)  layer_weights, layer_ratios / layer_caps (after_prompt)
            S_h = int(T r_l share), S_r = int(T r_l (1 - share))   heavy_recent_sizes (first compression, T = seen)
    Step 3  h2o.heavy_recent_keep over h2o.accumulate_prefill_scores / accumulate_step_scores
    Step 4  m = max_c cos(k_e, k_c); tau <- EMA of m; merge iff mean_h m >= tau   nearest_kept, update_threshold,
            merge_decision
    Step 5  k_c <- weighted sum of k_c and its merged k_e      merge_weights_code, merge_weights_paper
    Step 6  evict_and_merge, called by D2O.after_step

Per-row state (head variances, ratio, S_h/S_r, tau, merge counts) lives in each layer's `store.rows`.
Budgets as a ratio or a count, and the deviations (per KV head, tau per row, ...): train_free.md §9."""
from __future__ import annotations

import math

import torch

from minikv.store import NO_POS, KVCache, LayerStore
from minikv.policies.base import Policy, choice_option, float_option, int_option
from minikv.policies.h2o import (SCORES, accumulate_prefill_scores, accumulate_step_scores, heavy_recent_keep,
                                 ranked_scores)
from minikv.errors import BadInput, is_int

MERGE_WEIGHTS = ("code", "paper")          # Step 5 weights
THRESHOLD_RULES = ("code", "paper")        # Step 4 update of tau
DEFAULT_BETA = {"code": 0.5, "paper": 0.7}  # beta, the weight of the new similarities, per threshold rule
ALLOCATIONS = ("variance", "uniform")
SIMILARITY_CHUNK = 64                       # Steps 4-5 take this many evicted keys at once (the E x S products)
WHENS = ("first_decode", "prefill")         # the first compression: at the first decode step, or right after prefill

# ---- Step 1: layer statistic ---------------------------------------------------------------------------------
def head_variances(colsum: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Step 1: v = unbiased variance over key positions of each query head's column sums. (B, Hq) float64.
    colsum: (B, Hkv, G, S) attention received per entry, summed over prompt queries; valid: (B, Hkv, S) live slots."""
    B, Hkv, G, S = colsum.shape
    col = colsum.double().reshape(B, Hkv * G, S)                           # (B, Hq, S); query head j -> KV j // G
    mask = valid[:, :, None, :].expand(B, Hkv, G, S).reshape(B, Hkv * G, S)  # (B, Hq, S)
    n = mask.sum(-1)                                                      # (B, Hq)
    mean = (col * mask).sum(-1) / n.clamp_min(1)                          # (B, Hq)
    return ((col - mean[..., None]) ** 2 * mask).sum(-1) / (n - 1).clamp_min(1)   # (B, Hq) unbiased

def variance_statistic(v: torch.Tensor) -> torch.Tensor:
    """Step 1: F = mean_h (v_h - min v) / (max v - min v + 1e-6) from the batch-mean head variances v (Hq,). ()"""
    return ((v - v.min()) / (v.max() - v.min() + 1e-6)).mean()

# ---- Step 2: per-layer ratios and sizes ------------------------------------------------------------------------
def layer_weights(F: torch.Tensor) -> torch.Tensor:
    """Step 2: w = softmax(-F) over the L layers. (L,) -> (L,); each L*w_l lies in [1/e, e] since F in [0, 1]."""
    return torch.softmax(-F.double(), dim=0)

def layer_shares(F: torch.Tensor, allocation: str) -> torch.Tensor:
    """Step 2: each layer's multiple of the nominal budget, L * softmax(-F)_l ("variance") or 1 ("uniform"). (L,)"""
    uniform = choice_option("d2o", "allocation", allocation, ALLOCATIONS) == "uniform"   # an unknown one is refused
    return torch.ones(F.shape[0], dtype=torch.float64) if uniform else layer_weights(F) * F.shape[0]

def layer_ratios(F: torch.Tensor, rho: torch.Tensor, protected: set[int] = frozenset(),
                 allocation: str = "variance") -> torch.Tensor:
    """Step 2: r_l = clamp(softmax(-F)_l * L * rho, 0.01, 1) ("uniform": rho); protected layers get 1. (L, B).
    F: (L,); rho: (B,) nominal ratio per batch row. Protected layers' shares are not redistributed."""
    r = (layer_shares(F, allocation)[:, None] * rho.double()[None, :]).clamp(0.01, 1.0)   # (L, B)
    r[list(protected)] = 1.0
    return r

def layer_caps(F: torch.Tensor, count: int, protected: set[int] = frozenset(), allocation: str = "variance",
               n_rows: int = 1) -> torch.Tensor:
    """Step 2 for a count budget c: cap_l = max(1, floor(softmax(-F)_l * L * c)) entries per head ("uniform": c);
    protected layers get -1 (never compressed). (L, B) long. Before flooring, sum_l cap_l = L * c."""
    raw = (layer_shares(F, allocation) * count).floor().clamp_min(1).long()   # (L,)
    raw[list(protected)] = -1
    return raw[:, None].expand(len(raw), n_rows).clone()

def heavy_recent_sizes(T: torch.Tensor, ratio: torch.Tensor, heavy_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: S_h = int(T * r * heavy_share), S_r = int(T * r * (1 - heavy_share)), per batch row. Each (B,) long."""
    budget = T.double() * ratio.double()                                  # (B,)
    return (budget * heavy_share).floor().long(), (budget * (1 - heavy_share)).floor().long()

# ---- Step 4: nearest kept entry, threshold, decision -----------------------------------------------------------
def evicted_slots(evict: torch.Tensor, pos: torch.Tensor, E: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the evicted entries of each head in position order, padded to E (None: the most any head evicts,
    one host sync): ((B, Hkv, E) long, (B, Hkv, E) real). E = 1 (a decode step): an arg-min, fused when compiled."""
    counts, key = evict.sum(-1), torch.where(evict, pos, NO_POS)          # (B, Hkv), (B, Hkv, S)
    E = (int(counts.max()) if counts.numel() else 0) if E is None else E
    order = key.argmin(-1, keepdim=True) if E == 1 else torch.topk(key, E, -1, largest=False).indices  # oldest first
    return order, torch.arange(E, device=evict.device) < counts[..., None]

def nearest_kept(k: torch.Tensor, src_slot: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor, in_order=False,
                 norm: torch.Tensor | None = None):
    """Step 4: u = cos(k_e, K_c) over the kept keys of the same head; returns (m = max u, j* = argmax u slot).
    k: (B, Hkv, S, d); src_slot: (B, Hkv, E) evicted slots; keep, pos, norm (keys' norms; None: computed): (B, Hkv, S);
    in_order: slots in position order (nothing evicted yet). m: (B, Hkv, E), -inf where the head keeps nothing."""
    norm, out = (k.norm(dim=-1) if norm is None else norm)[..., None].clamp_min(1e-8), []   # (B, Hkv, S, 1)
    for src in src_slot.split(SIMILARITY_CHUNK, dim=-1):           # (B, Hkv, C): at most C x S products at once
        ke = torch.gather(k, 2, src[..., None].expand(*src.shape, k.shape[-1])) / torch.gather(norm, 2, src[..., None])
        u = (ke @ k.transpose(-1, -2)).div_(norm.transpose(-1, -2)).masked_fill_(~keep[:, :, None, :], float("-inf"))
        m, j = u.max(dim=-1, keepdim=True)                      # (B, Hkv, C, 1): the first maximum, oldest in order
        j = j if in_order else torch.where(u == m, pos[:, :, None, :], NO_POS).argmin(-1, keepdim=True)  # oldest max
        out.append((m.squeeze(-1), j.squeeze(-1)))
    return tuple(torch.cat(x, -1) if len(x) > 1 else x[0] for x in zip(*out))   # (B, Hkv, E) each; a step: no copy

def update_threshold(tau: torch.Tensor, m: torch.Tensor, real: torch.Tensor, alpha: float = 0.5,
                     beta: float = 0.5, rule: str = "code") -> torch.Tensor:
    """Step 4: first compression (tau NaN) tau = mean(m); later "code" tau <- alpha*tau + beta*mean(m), "paper"
    tau <- beta*max(m) + (1 - beta)*tau. Rows without evictions keep tau. tau: (B,) float64; m, real: (B, Hkv, E)."""
    w = real.reshape(m.shape[0], -1)                                      # (B, Hkv * E) the real entries of a row
    mean, has = torch.where(w, m.reshape(w.shape).double(), 0.0).sum(-1) / w.sum(-1).clamp_min(1), w.any(-1)   # (B,)
    if rule == "paper":
        mx = torch.where(real, m.double(), float("-inf")).reshape(m.shape[0], -1).amax(-1) if m.numel() else mean
    code = choice_option("d2o", "threshold_rule", rule, THRESHOLD_RULES) == "code"     # an unknown rule is refused
    later = alpha * tau + beta * mean if code else beta * mx + (1 - beta) * tau
    return torch.where(has, torch.where(torch.isnan(tau), mean, later), tau)

def merge_decision(m: torch.Tensor, real: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Step 4: merge the k-th evicted entry of every head iff mean over heads of m[:, :, k] >= tau. (B, Hkv, E)."""
    n = real.sum(dim=1)                                                   # (B, E) heads with a k-th entry
    mean = torch.where(real, m.double(), 0.0).sum(dim=1) / n.clamp_min(1)   # (B, E)
    decide = (n > 0) & (mean >= tau[:, None])                             # (B, E)
    return decide[:, None, :] & real & torch.isfinite(m)

# ---- Step 5: merge weights -------------------------------------------------------------------------------------
def merge_weights_code(m: torch.Tensor, dst: torch.Tensor, merged: torch.Tensor, S: int):
    """Step 5 ("code"): k_c <- (k_c + sum_{e in I_c} m_e k_e) / (1 + |I_c|), i.e. scatter-mean with include_self.
    m, dst, merged: (B, Hkv, E). Returns (src_weight (B, Hkv, E), dst_scale (B, Hkv, S)) for LayerStore.merge."""
    count = torch.zeros(*dst.shape[:2], S, dtype=m.dtype, device=dst.device).scatter_add(2, dst, merged.to(m.dtype))
    scale = 1.0 / (1.0 + count)                                           # (B, Hkv, S)
    return torch.where(merged, m, 0.0) * torch.gather(scale, 2, dst), scale

def merge_weights_paper(m: torch.Tensor, dst: torch.Tensor, merged: torch.Tensor, S: int):
    """Step 5 ("paper"): w_e = exp(u_e) / (sum_{I_c} exp(u_e') + e), w_c = e / (sum exp(u_e') + e); convex, with
    u_e = cos(k_e, k_c) = m_e for e's nearest kept c. Returns (src_weight (B, Hkv, E), dst_scale (B, Hkv, S))."""
    ex = torch.where(merged, torch.exp(torch.where(merged, m, 0.0)), 0.0)   # (B, Hkv, E)
    denom = torch.full((*dst.shape[:2], S), math.e, dtype=ex.dtype, device=dst.device).scatter_add(2, dst, ex)
    return ex / torch.gather(denom, 2, dst), math.e / denom

# ---- Step 6: one compression of one layer ----------------------------------------------------------------------
def evict_and_merge(store: LayerStore, keep: torch.Tensor, tau: torch.Tensor, alpha: float = 0.5, beta: float = 0.5,
                    merge_weights: str = "code", tau_override: float | None = None, threshold_rule: str | None = None,
                    max_evicted: int | None = None):
    """Steps 4-5 after the selection: nearest kept entry, threshold, merge or drop, then eviction.
    keep: (B, Hkv, S) Step 3's selection; tau: (B,) float64 (NaN before the first compression); threshold_rule: default
    the weights' rule; max_evicted: a host bound per head (None: one sync). Returns (tau, merged, dropped), each (B,)."""
    evict, norm = store.valid & ~keep, store.stats.get("key_norm")       # (B, Hkv, S) each; norm: see D2O._compress
    src, real = evicted_slots(evict, store.pos, max_evicted)              # (B, Hkv, E)
    m, j = nearest_kept(store.k, src, keep, store.pos, store.heads_aligned, norm)
    real_m = real & torch.isfinite(m)                                     # heads that keep nothing cannot merge
    tau = (update_threshold(tau, m, real_m, alpha, beta, threshold_rule or merge_weights) if tau_override is None
           else torch.full_like(tau, float(tau_override)))                # updated before its use
    merged = merge_decision(m, real_m, tau)                               # (B, Hkv, E)
    n_merged = merged.sum(dim=(1, 2))                                     # (B,)
    weights = merge_weights_code if merge_weights == "code" else merge_weights_paper
    src_w, dst_scale = weights(m, j, merged, store.capacity)              # weight 0 / scale 1: nothing merged
    store.merge(j, src, src_w, dst_scale, SIMILARITY_CHUNK)
    if norm is not None:                                                  # merged keys changed: so did their norms
        update_norms(store, j)
    store.keep(keep)
    return tau, n_merged, real.sum(dim=(1, 2)) - n_merged

def update_norms(store: LayerStore, slot: torch.Tensor) -> None:
    """The "key_norm" statistic recomputed at `slot` (B, Hkv, n) from the keys there (n entries per head, not S)."""
    for s in slot.split(SIMILARITY_CHUNK, dim=-1):                         # (B, Hkv, c): no (n, d) copy of keys
        keys = torch.gather(store.k, 2, s[..., None].expand(*s.shape, store.k.shape[-1]))   # (B, Hkv, c, d)
        store.stats["key_norm"].scatter_(2, s, keys.norm(dim=-1))

def protected_layer_option(value) -> tuple[int, ...] | None:
    """protected_layers as a tuple of layer indices (None = the default 0, 1, L-1; one int is one layer)."""
    items = [value] if is_int(value) else value
    if value is not None and not isinstance(items, (list, tuple, set, frozenset)):
        raise BadInput(f"d2o: protected_layers must be a list of layer indices (e.g. 0,1,29) or None, got {value!r}")
    return None if value is None else tuple(int_option("d2o", "protected_layers", v, what="layer index") for v in items)

class D2O(Policy):
    """D2O: variance-based layer ratios, H2O selection with sinks, threshold-gated merging of evicted entries.
    when="prefill": every layer's Step 1 in a first pass over the prompt (its entries dropped as it goes), Step 2, then
    a second pass compresses each layer as it runs, so the whole prompt's cache never exists at once (train_free §6)."""
    name = "d2o"
    summary = "D2O: variance-weighted layer budgets, H2O selection with sinks, evicted entries merged when similar"
    prefill_needs = frozenset({"colsum"})
    decode_needs = frozenset({"probs"})
    decode_evicts = True

    def __init__(self, budget=0.2, heavy_share: float = 0.5, n_sink: int = 4, protected_layers=None,
                 alpha: float = 0.5, beta: float | None = None, merge_weights: str = "code",
                 threshold_rule: str = "code", allocation: str = "variance",
                 tau_override: float | None = None, score: str = "sum", when: str = "first_decode"):
        super().__init__(budget)
        self.heavy_share = float_option("d2o", "heavy_share", heavy_share, 0, 1, what="budget share of heavy hitters")
        self.n_sink = int_option("d2o", "n_sink", n_sink, lo=0, what="first positions always kept")
        self.merge_weights = choice_option("d2o", "merge_weights", merge_weights, MERGE_WEIGHTS, what="Step 5 weights")
        self.threshold_rule = choice_option("d2o", "threshold_rule", threshold_rule, THRESHOLD_RULES,
                                            what="Step 4 update of tau")
        self.allocation = choice_option("d2o", "allocation", allocation, ALLOCATIONS)
        self.when = choice_option("d2o", "when", when, WHENS, what="the first compression")
        self.prefill_pass = "statistics_first" if self.when == "prefill" else "one_pass"
        self.score = choice_option("d2o", "score", score, SCORES, what="'mean': kvpress's ObservedAttentionPress")
        self.alpha = float_option("d2o", "alpha", alpha, what="weight of the old threshold")
        self.beta = float_option("d2o", "beta", DEFAULT_BETA[threshold_rule] if beta is None else beta,
                                 what="weight of the new similarities")
        if tau_override is not None and not (is_int(tau_override) or isinstance(tau_override, float)
                                             and not math.isnan(tau_override)):
            raise BadInput(f"d2o: tau_override must be a number (+inf never merges) or None, got {tau_override!r}")
        self.protected_layers, self.tau_override = protected_layer_option(protected_layers), tau_override

    def protected(self, n_layers: int) -> set[int]:
        """Layers never compressed (default 0, 1, L-1), checked against the model's depth."""
        prot = (0, 1, n_layers - 1) if self.protected_layers is None else self.protected_layers
        bad = [p for p in prot if not -n_layers <= p < n_layers]
        if bad:
            raise BadInput(f"protected_layers {bad} out of range for a model with {n_layers} layers")
        return {p % n_layers for p in prot}

    def first_pass(self, store, scratch, stats):
        """when="prefill", first pass: Step 1 of one layer into `store`; `scratch`, the layer's prompt, emptied."""
        store.rows["head_var"] = head_variances(stats["colsum"], scratch.valid).cpu()    # (B, Hq)
        scratch.keep(torch.zeros_like(scratch.valid)), scratch.fit()

    def after_prefill(self, layer, store, stats):
        accumulate_prefill_scores(store, stats["colsum"])
        if self.when == "prefill":             # Step 2 ran after the first pass: compress this layer now (T = n)
            return self._compress(store)
        store.rows["head_var"] = head_variances(stats["colsum"], store.valid).cpu()      # (B, Hq), Step 1

    def after_prompt(self, cache):
        """Step 2 once every layer's F is known; each layer is first compressed at the first decode step."""
        for store, layer_rows in zip(cache.layers, self.allocate(cache)):
            store.host["never_compressed"] = bool(layer_rows["full"].all())
            store.rows.update({name: x.to(store.k.device) for name, x in layer_rows.items()})

    def report(self, cache=None):
        """The generic report, with each row's threshold history cut to its compressions."""
        r = super().report(cache)
        for layer in r.get("layers", []):
            layer["tau_history"] = [h[:n] for h, n in zip(layer["tau_history"], layer.pop("compressions"))]
        return r

    def after_step(self, layer, store, stats):
        accumulate_step_scores(store, stats["probs"])
        self._compress(store)
        store.host["step_compressed"] = True     # a head now holds S_h + S_r entries: each later step evicts <= 1

    def allocate(self, cache: KVCache) -> list[dict]:
        """Step 2: per layer, the rows' ratio r_l, whether they are never compressed, S_h/S_r (known now for a
        count budget, -1 = set at the first compression), and fresh tau / merge counters. One dict per layer."""
        F, protected = layer_statistics(cache), self.protected(len(cache.layers))
        n = cache.layers[0].rows["prompt_len"].cpu().double()                                  # (B,) prompt lengths
        rho = torch.full_like(n, self.budget.value) if self.budget.is_ratio else self.budget.value / n   # (B,) nominal
        B, L = rho.shape[0], F.shape[0]
        S_h = S_r = torch.full((L, B), -1, dtype=torch.long)
        if self.budget.is_ratio:
            ratios = layer_ratios(F, rho, protected, self.allocation)                     # (L, B)
            full = (ratios >= 1.0) | (rho >= 1.0)[None, :]
        else:                                   # a count: fixed per-layer caps, sizes known now (module docstring)
            caps = layer_caps(F, int(self.budget.value), protected, self.allocation, B)   # (L, B)
            ratios = caps.double() / n[None, :]                                          # reported only
            full = caps < 0
            h = self.heavy_share                                                          # S_h, S_r as heavy_recent_sizes
            S_h, S_r = (torch.where(caps < 0, -1, (caps * s).floor().long()) for s in (h, 1 - h))
        full[list(protected)] = True
        Lw = layer_shares(F, "variance")                                                  # L * softmax(-F)_l
        return [{"F": F[l].expand(B), "Lw": Lw[l].expand(B), "rho": rho, "protected": torch.full((B,), l in protected),
                 "ratio": ratios[l], "full": full[l], "S_h": S_h[l], "S_r": S_r[l],
                 "tau": torch.full((B,), float("nan"), dtype=torch.float64),
                 "tau_history": torch.full((B, cache.layers[0].max_capacity or 1 << 14), float("nan"),
                                           dtype=torch.float64), "compressions": torch.zeros(B, dtype=torch.long),
                 "merged": torch.zeros(B, dtype=torch.long), "dropped": torch.zeros(B, dtype=torch.long)}
                for l in range(L)]

    def _compress(self, store: LayerStore) -> None:
        """Step 3 selection (sizes fixed at the layer's first compression), then Steps 4-5; state updated in place."""
        r = store.rows
        if store.host["never_compressed"]:
            return
        first = not store.host.get("step_compressed")                     # (a prefill compression is not a step)
        if not store.host.get("sized") and self.budget.is_ratio:          # first compression: T = entries now
            r["S_h"], r["S_r"] = heavy_recent_sizes(store.seen, r["ratio"], self.heavy_share)
        store.host["sized"] = True
        if first:          # every key's norm, kept beside it from now on: a later step reads k once less (Step 4)
            store.stats["key_norm"] = store.k.norm(dim=-1)                # (B, Hkv, S), k's dtype
        else:              # the entry this step appended has the highest position of its head
            update_norms(store, store.pos.argmax(-1, keepdim=True))
        keep = heavy_recent_keep(store, ranked_scores(store, self.score), r["S_h"], r["S_r"], self.n_sink, not first)
        keep |= r["full"][:, None, None] & store.valid
        tau, merged, dropped = evict_and_merge(store, keep, r["tau"], self.alpha, self.beta, self.merge_weights,
                                               self.tau_override, self.threshold_rule, None if first else 1)
        r["tau"].copy_(tau)
        r["merged"] += merged
        r["dropped"] += dropped
        r["tau_history"].scatter_(1, r["compressions"][:, None], tau[:, None])
        r["compressions"] += 1

def layer_statistics(cache: KVCache) -> torch.Tensor:
    """Step 1 over the cache: F_l from the batch mean of every row's head variances (kept beside the rows). (L,)"""
    return torch.stack([variance_statistic(s.rows["head_var"].sum(dim=0) / s.rows["head_var"].shape[0])
                        for s in cache.layers])
