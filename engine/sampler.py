"""Sampler: turns one step's logits into one token per request (vLLM's semantics).

Order: raw logprobs (log_softmax of the logits as given) -> min_tokens (mask EOS and stop
token ids) -> repetition penalty -> presence/frequency penalties -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> sample (inverse CDF: one uniform per row).
A request with its own `generator` draws its uniform from it alone, so it samples the same
token whatever else is in the batch. Everything is batched; only per-request data
(token lists, generators) is gathered in Python, and only for the rows that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .request import Request
from .sampling_params import GREEDY_EPS, SamplingParams


@dataclass
class TokenLogprobs:
    """The sampled token's raw logprob and rank, plus the top-k (most likely first)."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the sampled token in the raw distribution
    top: list[tuple[int, float]]  # k = sampling_params.logprobs (empty for 0)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request asked for no logprobs


# top-p looks for its cut among this many most likely tokens before sorting a whole row.
_TOP_P_CANDIDATES = 256
# Inverse-CDF sampling sums blocks of this many tokens, then scans one block.
_DRAW_BLOCK = 256


def _is_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_EPS


class Sampler:
    """Stateless; `sampler(logits[N, V], requests)` samples row i for requests[i]."""

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        n = len(requests)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(
                f"logits must have shape [num_requests={n}, vocab], got {tuple(logits.shape)}"
            )
        if n == 0:
            return SamplerOutput(token_ids=[], logprobs=[])
        logits = logits.float()
        params = [r.sampling_params for r in requests]

        # Logprobs of the raw model distribution, before any processing.
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if lp_rows:
            src = logits if len(lp_rows) == n else logits[lp_rows]
            raw_logprobs = torch.log_softmax(src, dim=-1)

        logits = apply_penalties(logits, requests)

        greedy = [_is_greedy(p) for p in params]
        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = _sample(logits, requests, greedy)

        token_list: list[int] = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * n
        if raw_logprobs is not None:
            sampled = token_ids if len(lp_rows) == n else token_ids[lp_rows]
            for j, entry in zip(
                lp_rows, _gather_logprobs(raw_logprobs, sampled, lp_rows, params), strict=True
            ):
                logprobs[j] = entry
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)


# --------------------------------------------------------------------------- processors


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """min_tokens masking, repetition penalty, presence/frequency penalties.

    Returns `logits` itself when no request needs any of them, else a modified copy (the
    input is never written to). Only the affected (row, token) entries are touched.
    """
    out = None
    for step in (_apply_min_tokens, _apply_repetition_penalty, _apply_presence_frequency):
        changed = step(logits if out is None else out, requests, copy=out is None)
        if changed is not None:
            out = changed
    return logits if out is None else out


def sampling_probs(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """The distribution each row is sampled from, after every processing step.

    Greedy rows are one-hot at their argmax. The sampler draws from exactly these
    probabilities (for tests, and for rejection sampling in speculative decoding).
    """
    logits = apply_penalties(logits.float(), requests)
    params = [r.sampling_params for r in requests]
    probs = torch.softmax(_filter(logits, params), dim=-1)
    greedy_rows = [i for i, p in enumerate(params) if _is_greedy(p)]
    if greedy_rows:
        g = torch.tensor(greedy_rows, dtype=torch.long, device=logits.device)
        one_hot = torch.zeros(
            len(greedy_rows), logits.shape[1], dtype=probs.dtype, device=probs.device
        )
        one_hot.scatter_(1, logits.index_select(0, g).argmax(dim=-1, keepdim=True), 1.0)
        probs = probs.index_copy(0, g, one_hot)
    return probs


def _token_pairs(
    rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (row, token id) pairs of per-row token lists, with their counts.

    Ids outside [0, vocab) are dropped (a padded vocab can be smaller than the tokenizer's).
    """
    row_idx: list[int] = []
    col_idx: list[int] = []
    for r, toks in zip(rows, token_lists, strict=True):
        row_idx.extend([r] * len(toks))
        col_idx.extend(toks)
    rows_t = torch.tensor(row_idx, dtype=torch.long)
    cols_t = torch.tensor(col_idx, dtype=torch.long)
    keep = (cols_t >= 0) & (cols_t < vocab)
    keys, counts = torch.unique(rows_t[keep] * vocab + cols_t[keep], return_counts=True)
    return (
        (keys // vocab).to(device),
        (keys % vocab).to(device),
        counts.to(device),
    )


def _apply_min_tokens(
    logits: torch.Tensor, requests: Sequence[Request], copy: bool
) -> torch.Tensor | None:
    """While a request has fewer than min_tokens outputs, EOS and stop token ids are -inf."""
    rows: list[int] = []
    banned: list[list[int]] = []
    for i, r in enumerate(requests):
        p = r.sampling_params
        if p.min_tokens and len(r.output_token_ids) < p.min_tokens:
            ids = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                ids |= set(r.eos_token_ids)
            if ids:
                rows.append(i)
                banned.append(sorted(ids))
    if not rows:
        return None
    out = logits.clone() if copy else logits
    r_t, c_t, _ = _token_pairs(rows, banned, logits.shape[1], logits.device)
    out[r_t, c_t] = float("-inf")
    return out


def _apply_repetition_penalty(
    logits: torch.Tensor, requests: Sequence[Request], copy: bool
) -> torch.Tensor | None:
    """HF/vLLM: for tokens seen in prompt or output, positive logits / p, negative * p."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.repetition_penalty != 1.0]
    if not rows:
        return None
    dev = logits.device
    tokens = [requests[i].all_token_ids for i in rows]
    r_t, c_t, _ = _token_pairs(rows, tokens, logits.shape[1], dev)
    penalty = torch.ones(logits.shape[0], dtype=logits.dtype)
    penalty[rows] = torch.tensor(
        [requests[i].sampling_params.repetition_penalty for i in rows], dtype=logits.dtype
    )
    pen = penalty.to(dev)[r_t]
    out = logits.clone() if copy else logits
    vals = out[r_t, c_t]
    out[r_t, c_t] = torch.where(vals > 0, vals / pen, vals * pen)
    return out


def _apply_presence_frequency(
    logits: torch.Tensor, requests: Sequence[Request], copy: bool
) -> torch.Tensor | None:
    """OpenAI: logit -= frequency * count + presence * (count > 0), over output tokens."""
    rows = [
        i
        for i, r in enumerate(requests)
        if (r.sampling_params.presence_penalty or r.sampling_params.frequency_penalty)
        and r.output_token_ids
    ]
    if not rows:
        return None
    dev = logits.device
    tokens = [requests[i].output_token_ids for i in rows]
    r_t, c_t, counts = _token_pairs(rows, tokens, logits.shape[1], dev)
    freq = torch.zeros(logits.shape[0], dtype=logits.dtype)
    pres = torch.zeros(logits.shape[0], dtype=logits.dtype)
    freq[rows] = torch.tensor(
        [requests[i].sampling_params.frequency_penalty for i in rows], dtype=logits.dtype
    )
    pres[rows] = torch.tensor(
        [requests[i].sampling_params.presence_penalty for i in rows], dtype=logits.dtype
    )
    out = logits.clone() if copy else logits
    vals = out[r_t, c_t]
    out[r_t, c_t] = vals - freq.to(dev)[r_t] * counts.to(logits.dtype) - pres.to(dev)[r_t]
    return out


# --------------------------------------------------------------------------- sampling


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties at the k-th value kept); k <= 0 or >= V: all."""
    vocab = logits.shape[1]
    active = (top_k > 0) & (top_k < vocab)
    if not bool(active.any()):
        return logits
    k = torch.where(active, top_k, torch.ones_like(top_k))
    kmax = int(k.max())
    top_vals = logits.topk(kmax, dim=-1).values
    threshold = top_vals.gather(1, (k - 1).unsqueeze(1))
    threshold = torch.where(
        active.unsqueeze(1), threshold, torch.full_like(threshold, float("-inf"))
    )
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = 0) -> torch.Tensor:
    """Keep the smallest most-likely set whose probability reaches top_p (always >= 1 token).

    A token is kept when the tokens more likely than it (in sorted order) hold less than
    top_p; ties at the cut are all kept. The cut is looked for among each row's
    `candidates` most likely tokens (topk is far cheaper than a full sort; after top-k,
    k candidates hold all the mass); only rows whose candidates fall short are sorted.
    """
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    vocab = logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    threshold, resolved = _top_p_cut(probs, top_p, min(vocab, candidates or _TOP_P_CANDIDATES))
    resolved |= ~active
    if not bool(resolved.all()):
        rest = (~resolved).nonzero().squeeze(1)
        threshold[rest] = _top_p_cut(probs[rest], top_p[rest], vocab)[0]
    threshold = torch.where(active, threshold, torch.zeros_like(threshold))
    return logits.masked_fill(probs < threshold.unsqueeze(1), float("-inf"))


def _top_p_cut(
    probs: torch.Tensor, top_p: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability of the last kept token, whether the m most likely tokens decide it)."""
    if m < probs.shape[1]:
        values = probs.topk(m, dim=-1).values
    else:
        values = probs.sort(dim=-1, descending=True).values
    cum = values.cumsum(dim=-1)
    n_keep = ((cum - values) < top_p.unsqueeze(1)).sum(dim=-1).clamp_(min=1)
    resolved = (cum[:, -1] >= top_p) | (m >= probs.shape[1])
    return values.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1), resolved


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    active = min_p > 0.0
    if not bool(active.any()):
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability
    exceeds uniforms[i] * (row total).

    Two levels keep it accurate and cheap: per-block sums (float32 over _DRAW_BLOCK tokens,
    then float64 across blocks) pick a block, a float64 cumulative sum inside that one block
    picks the token, so every token's probability is kept to ~1e-7 relative, however small
    it is (one float32 cumsum over the vocab would lose tokens below ~6e-8 outright). A token
    with p = 0 is never taken (its CDF step is empty); each row ignores the other rows.
    """
    n, vocab = probs.shape
    bs = _DRAW_BLOCK
    nb = -(-vocab // bs)
    padded = probs if nb * bs == vocab else torch.nn.functional.pad(probs, (0, nb * bs - vocab))
    blocks = padded.view(n, nb, bs)
    block_cdf = blocks.sum(dim=-1).to(torch.float64).cumsum(dim=-1)
    target = uniforms.to(probs.device, torch.float64) * block_cdf[:, -1]
    b = torch.searchsorted(block_cdf, target.unsqueeze(1), right=True).squeeze(1)
    b.clamp_(max=nb - 1)
    before = block_cdf.gather(1, (b - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(b > 0, before, torch.zeros_like(before))
    rows = torch.arange(n, device=probs.device)
    inner = blocks[rows, b].cumsum(dim=-1, dtype=torch.float64)
    j = torch.searchsorted(inner, (target - before).unsqueeze(1), right=True).squeeze(1)
    idx = b * bs + j.clamp_(max=bs - 1)
    # Rounding can push the target past a block's end (onto padding or a p = 0 token):
    # a ~1e-16 event; take the row's most likely token then.
    empty = padded.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0
    if bool(empty.any()):
        idx = torch.where(empty, probs.argmax(dim=-1), idx)
    return idx


def _sample(logits: torch.Tensor, requests: Sequence[Request], greedy: list[bool]) -> torch.Tensor:
    """Greedy rows take the argmax; the others are filtered and drawn (see module doc)."""
    n = logits.shape[0]
    dev = logits.device
    token_ids = logits.argmax(dim=-1) if any(greedy) else None
    rows = [i for i in range(n) if not greedy[i]]
    params = [requests[i].sampling_params for i in rows]
    x = logits if len(rows) == n else logits[rows]
    probs = torch.softmax(_filter(x, params), dim=-1)

    # One uniform per row: unseeded rows share one batched draw, a seeded row draws from
    # its own generator (on the generator's device), so its token ignores the batch.
    gens = [requests[i].generator for i in rows]
    if all(g is None for g in gens):
        uniforms = torch.rand(len(rows), dtype=torch.float64, device=dev)
    else:
        shared = torch.rand(len(rows), dtype=torch.float64).tolist()
        uniforms = torch.tensor(
            [
                shared[j]
                if g is None
                else float(torch.rand(1, dtype=torch.float64, generator=g, device=g.device))
                for j, g in enumerate(gens)
            ],
            dtype=torch.float64,
            device=dev,
        )
    sampled = draw(probs, uniforms)

    if token_ids is None:
        return sampled
    return token_ids.index_copy(0, torch.tensor(rows, dtype=torch.long, device=dev), sampled)


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, each only when some row uses it (greedy rows: T=1)."""
    dev = x.device
    # Always a per-row tensor (never a Python scalar, which some kernels turn into a
    # reciprocal multiply): a row's result must not depend on the rest of the batch.
    temps = [1.0 if _is_greedy(p) else p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x = x / torch.tensor(temps, dtype=x.dtype, device=dev).unsqueeze(1)
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        x = apply_top_k(x, torch.tensor(top_ks, dtype=torch.long, device=dev))
    if any(p.top_p < 1.0 for p in params):
        # Every row cut to its top k: the first max(k) candidates carry all the mass.
        candidates = max(top_ks) if all(k > 0 for k in top_ks) else 0
        top_p = torch.tensor([p.top_p for p in params], dtype=x.dtype, device=dev)
        x = apply_top_p(x, top_p, candidates)
    if any(p.min_p > 0.0 for p in params):
        x = apply_min_p(x, torch.tensor([p.min_p for p in params], dtype=x.dtype, device=dev))
    return x


def _gather_logprobs(
    raw_logprobs: torch.Tensor,
    sampled: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
) -> list[TokenLogprobs]:
    return token_logprobs(raw_logprobs, sampled, [params[i].logprobs or 0 for i in rows])


def token_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]
) -> list[TokenLogprobs]:
    """Row j: the logprob and rank of `token_ids[j]` under `raw_logprobs[j]`, and the top
    `ks[j]` (token, logprob) pairs. Shared by sampled tokens and prompt logprobs."""
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
    kmax = min(max(ks), raw_logprobs.shape[1])
    if kmax > 0:
        top_vals, top_ids = raw_logprobs.topk(kmax, dim=-1)
        top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    chosen_l = chosen.squeeze(1).tolist()
    ranks_l = ranks.tolist()
    ids_l = token_ids.tolist()
    out = []
    for j, k in enumerate(ks):
        top = list(zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True)) if k > 0 else []
        out.append(TokenLogprobs(token_id=ids_l[j], logprob=chosen_l[j], rank=ranks_l[j], top=top))
    return out
