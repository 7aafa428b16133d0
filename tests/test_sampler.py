"""Sampler: greedy, filtering (top-k / top-p / min-p), seeds, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from rayfleet.engine.request import Request
from rayfleet.engine.sampler import (
    Sampler,
    SamplerOutput,
    apply_penalties,
    draw,
    sampling_probs,
)
from rayfleet.engine.sampling_params import SamplingParams

EOS = 0


def make_request(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    eos: frozenset[int] = frozenset({EOS}),
    **params,
) -> Request:
    sp = SamplingParams(seed=seed, **params)
    req = Request(
        request_id="r",
        parent_id="r",
        sample_index=0,
        prompt_token_ids=list(prompt or [5, 6, 7]),
        sampling_params=sp,
        eos_token_ids=eos,
        max_tokens=sp.max_tokens or 16,
    )
    req.output_token_ids = list(output or [])
    if seed is not None:
        req.generator = torch.Generator().manual_seed(seed)
    return req


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------ reference filters


def reference_probs(
    logits: list[float], temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0
) -> list[float]:
    """Plain-Python filtered distribution: temperature, top-k, top-p, min-p, in that order."""
    x = [v / temperature for v in logits]
    keep = [True] * len(x)
    if 0 < top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = [k and v >= kth for k, v in zip(keep, x, strict=True)]

    def softmax(vals, mask):
        m = max(v for v, k in zip(vals, mask, strict=True) if k)
        e = [math.exp(v - m) if k else 0.0 for v, k in zip(vals, mask, strict=True)]
        s = sum(e)
        return [v / s for v in e]

    if top_p < 1.0:
        p = softmax(x, keep)
        order = sorted(range(len(x)), key=lambda i: -p[i])
        cum = 0.0
        new_keep = [False] * len(x)
        for i in order:
            if cum >= top_p or not keep[i]:
                break
            new_keep[i] = True
            cum += p[i]
        keep = new_keep
    if min_p > 0.0:
        p = softmax(x, keep)
        pmax = max(p)
        keep = [k and pi >= min_p * pmax for k, pi in zip(keep, p, strict=True)]
    return softmax(x, keep)


FILTER_CASES = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_p=0.6),
    dict(temperature=1.3, min_p=0.2),
    dict(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05),
    dict(temperature=2.0, top_k=1),
    dict(temperature=1.0, top_p=0.01),
]


# ------------------------------------------------------------------ greedy


def test_greedy_equals_argmax():
    logits = random_logits(8, 1000)
    out = Sampler()(logits, [make_request(temperature=0.0) for _ in range(8)])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(6, 500, seed=1)
    reqs = [make_request(temperature=0.0 if i % 2 == 0 else 1.0, top_k=3) for i in range(6)]
    out = Sampler()(logits, reqs)
    argmax = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_temperature_below_greedy_eps_is_greedy():
    logits = random_logits(4, 300, seed=2)
    out = Sampler()(logits, [make_request(temperature=1e-6) for _ in range(4)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_sampler_does_not_modify_the_logits():
    logits = random_logits(3, 100, seed=3)
    before = logits.clone()
    reqs = [
        make_request(output=[1, 2], repetition_penalty=1.5, frequency_penalty=1.0, min_tokens=5),
        make_request(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, logprobs=2),
        make_request(seed=1, temperature=0.0),
    ]
    Sampler()(logits, reqs)
    assert torch.equal(logits, before)


def test_empty_batch():
    assert Sampler()(torch.empty(0, 10), []) == SamplerOutput(token_ids=[], logprobs=[])


def test_logits_rows_must_match_requests():
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(2, 10), [make_request()])


# ------------------------------------------------------------------ filtering


@pytest.mark.parametrize(
    "case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_filtered_distribution_matches_reference(case):
    logits = random_logits(4, 64, seed=4)
    reqs = [make_request(**case) for _ in range(4)]
    probs = sampling_probs(logits, reqs)
    for row in range(4):
        ref = torch.tensor(reference_probs(logits[row].tolist(), **case))
        assert torch.equal(probs[row] > 0, ref > 0), "support differs from the reference"
        torch.testing.assert_close(probs[row], ref.float(), atol=1e-5, rtol=1e-4)


def test_rows_with_different_params_filter_independently():
    logits = random_logits(len(FILTER_CASES), 64, seed=5)
    reqs = [make_request(**case) for case in FILTER_CASES]
    probs = sampling_probs(logits, reqs)
    for row, case in enumerate(FILTER_CASES):
        ref = torch.tensor(reference_probs(logits[row].tolist(), **case)).float()
        torch.testing.assert_close(probs[row], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_samples_stay_in_the_allowed_set_and_follow_the_distribution(case):
    vocab, draws = 48, 6000
    row = random_logits(1, vocab, seed=6, scale=1.5)
    ref = torch.tensor(reference_probs(row[0].tolist(), **case))
    torch.manual_seed(1234)  # unseeded rows share one batched draw from the global RNG
    out = Sampler()(row.expand(draws, vocab), [make_request(**case) for _ in range(draws)])
    tokens = torch.tensor(out.token_ids)
    allowed = ref > 0
    assert bool(allowed[tokens].all()), "sampled a token that the filters removed"
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    # 4.5 standard deviations of a binomial proportion: fails by chance ~1e-5 per token.
    tol = 4.5 * torch.sqrt(ref * (1 - ref) / draws) + 1e-3
    assert bool(((freq - ref).abs() <= tol).all()), (freq, ref)


def test_seeded_samples_stay_in_the_allowed_set_and_follow_the_distribution():
    vocab, steps = 16, 2500
    logits = random_logits(1, vocab, seed=7, scale=1.0)
    case = dict(temperature=0.8, top_k=6, top_p=0.9)
    ref = torch.tensor(reference_probs(logits[0].tolist(), **case))
    req = make_request(seed=99, **case)
    sampler = Sampler()
    tokens = torch.tensor([sampler(logits, [req]).token_ids[0] for _ in range(steps)])
    assert bool((ref[tokens] > 0).all())
    freq = torch.bincount(tokens, minlength=vocab).double() / steps
    tol = 4.5 * torch.sqrt(ref * (1 - ref) / steps) + 1e-3
    assert bool(((freq - ref).abs() <= tol).all()), (freq, ref)


@pytest.mark.parametrize("scale", [0.3, 6.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_on_a_large_vocab_matches_reference(scale, top_p):
    # A flat row needs more than the first few hundred candidates to reach top_p (the
    # full-sort path); a peaked one reaches it among them (the fast path).
    logits = random_logits(3, 2000, seed=11, scale=scale)
    reqs = [make_request(top_p=top_p), make_request(top_p=1.0), make_request(top_p=top_p / 2)]
    probs = sampling_probs(logits, reqs)
    for row, req in enumerate(reqs):
        ref = torch.tensor(reference_probs(logits[row].tolist(), top_p=req.sampling_params.top_p))
        assert torch.equal(probs[row] > 0, ref > 0)
        torch.testing.assert_close(probs[row], ref.float(), atol=1e-6, rtol=1e-4)


def test_top_k_larger_than_vocab_keeps_everything():
    logits = random_logits(1, 20, seed=8)
    probs = sampling_probs(logits, [make_request(top_k=1000)])
    torch.testing.assert_close(probs[0], torch.softmax(logits[0], dim=-1))


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    probs = sampling_probs(logits, [make_request(top_p=1e-9)])
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------ draw (inverse CDF)


def test_draw_maps_uniforms_to_tokens_across_blocks():
    # Equal mass on tokens either side of the 256-token block boundaries, zeros elsewhere.
    vocab, support = 1000, [3, 255, 256, 700, 999]
    probs = torch.zeros(len(support) * 2 + 2, vocab)
    uniforms = [0.1, 0.3, 0.5, 0.7, 0.9, 0.19, 0.39, 0.59, 0.79, 0.99, 0.0, math.nextafter(1, 0)]
    expected = support + support + [3, 999]
    probs[:, support] = 0.2
    got = draw(probs, torch.tensor(uniforms, dtype=torch.float64))
    assert got.tolist() == expected


def test_draw_never_takes_a_zero_probability_token():
    vocab, rows = 777, 3000  # not a multiple of the block size
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(vocab, generator=gen)
    probs[torch.rand(vocab, generator=gen) < 0.7] = 0.0
    probs /= probs.sum()
    tokens = draw(probs.expand(rows, vocab), torch.rand(rows, dtype=torch.float64, generator=gen))
    assert bool((probs[tokens] > 0).all())
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    tol = 4.5 * torch.sqrt(probs.double() * (1 - probs.double()) / rows) + 1e-3
    assert bool(((freq - probs.double()).abs() <= tol).all())


def test_draw_keeps_tiny_probabilities():
    # A token at 1e-9 next to one at ~1: a single float32 cumsum would lose it entirely.
    probs = torch.zeros(1, 600)
    probs[0, 599], probs[0, 0] = 1e-9, 1.0 - 1e-9
    total = float(probs[0, 0]) + float(probs[0, 599])  # float64, as draw() sums them

    def at(u: float) -> int:
        return draw(probs, torch.tensor([u], dtype=torch.float64)).item()

    assert at(1.0 - 0.5e-9 / total) == 599  # inside the tiny token's 1e-9 slice
    assert at(1.0 - 2e-9 / total) == 0


# ------------------------------------------------------------------ seeds


def test_seeded_request_samples_the_same_tokens_whatever_the_batch():
    vocab, steps = 200, 12
    params = dict(temperature=1.1, top_k=50, top_p=0.95)
    logits_seq = [random_logits(1, vocab, seed=100 + s, scale=1.0) for s in range(steps)]
    sampler = Sampler()

    alone = make_request(seed=42, **params)
    expected = [sampler(step_logits, [alone]).token_ids[0] for step_logits in logits_seq]

    for position, batch_size in [(0, 3), (2, 5), (4, 5), (1, 8)]:
        target = make_request(seed=42, **params)
        torch.manual_seed(position)  # the unseeded neighbours draw differently each time
        got = []
        for s, step_logits in enumerate(logits_seq):
            others = random_logits(batch_size, vocab, seed=1000 * position + s)
            others[position] = step_logits[0]
            neighbours = [
                make_request(temperature=0.5 + 0.1 * i, top_k=i + 1, min_p=0.05 * (i % 3))
                if i % 3
                else make_request(seed=7 + i, temperature=1.0)
                for i in range(batch_size)
            ]
            neighbours[position] = target
            if batch_size > 3:
                neighbours[(position + 1) % batch_size] = make_request(temperature=0.0)
            got.append(sampler(others, neighbours).token_ids[position])
        assert got == expected, (position, batch_size)


def test_same_seed_same_tokens_different_seed_different_tokens():
    vocab = 1000
    logits = torch.zeros(1, vocab)  # uniform: every draw is informative
    sampler = Sampler()

    def run(seed):
        req = make_request(seed=seed)
        return [sampler(logits, [req]).token_ids[0] for _ in range(10)]

    assert run(3) == run(3)
    assert run(3) != run(4)


# ------------------------------------------------------------------ penalties


def test_repetition_penalty_matches_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    req = make_request(prompt=[0, 1], output=[3, 3], repetition_penalty=2.0)
    out = apply_penalties(logits, [req])
    # Seen (prompt + output): 0, 1, 3. Positive / 2, negative * 2; unseen untouched.
    expected = torch.tensor([[1.0, -2.0, 0.5, -1.0, 3.0, 1.0]])
    torch.testing.assert_close(out, expected)


def test_presence_and_frequency_penalties_match_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    # The prompt's tokens do not count for OpenAI penalties; output: 4 twice, 2 once.
    req = make_request(
        prompt=[0, 1, 5], output=[4, 2, 4], presence_penalty=0.5, frequency_penalty=0.25
    )
    out = apply_penalties(logits, [req])
    expected = torch.tensor([[2.0, -1.0, 0.5 - 0.25 * 1 - 0.5, -0.5, 3.0 - 0.25 * 2 - 0.5, 1.0]])
    torch.testing.assert_close(out, expected)


def test_all_penalties_together_apply_repetition_first():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5]])
    req = make_request(
        prompt=[0],
        output=[1, 1],
        repetition_penalty=1.25,
        presence_penalty=-1.0,
        frequency_penalty=0.5,
    )
    out = apply_penalties(logits, [req])
    expected = torch.tensor([[2.0 / 1.25, -1.0 * 1.25 - 0.5 * 2 + 1.0, 0.5, -0.5]])
    torch.testing.assert_close(out, expected)


def test_penalties_apply_per_row():
    logits = torch.tensor([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    reqs = [
        make_request(prompt=[0], output=[], repetition_penalty=2.0),
        make_request(prompt=[0], output=[1]),
        make_request(prompt=[0], output=[2], frequency_penalty=1.0),
    ]
    out = apply_penalties(logits, reqs)
    expected = torch.tensor([[1.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 1.0]])
    torch.testing.assert_close(out, expected)


def test_greedy_with_repetition_penalty_avoids_the_repeated_token():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    req = make_request(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, [req]).token_ids == [1]


# ------------------------------------------------------------------ min_tokens


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0]])  # EOS (0) then stop token 1 are the best
    req = make_request(
        temperature=0.0, min_tokens=3, stop_token_ids=[1], eos=frozenset({EOS}), output=[3, 3]
    )
    assert Sampler()(logits, [req]).token_ids == [2]
    req.output_token_ids.append(3)  # min_tokens reached: EOS is allowed again
    assert Sampler()(logits, [req]).token_ids == [0]


def test_min_tokens_masks_every_eos_id():
    logits = torch.tensor([[9.0, 8.0, 1.0, 7.0]])
    req = make_request(temperature=0.0, min_tokens=1, eos=frozenset({0, 1}))
    assert Sampler()(logits, [req]).token_ids == [3]


def test_min_tokens_with_ignore_eos_masks_only_stop_token_ids():
    logits = torch.tensor([[9.0, 8.0, 7.0]])
    req = make_request(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[1])
    out = apply_penalties(logits, [req])
    assert out[0, 0] == 9.0 and out[0, 1] == float("-inf")


def test_min_tokens_never_samples_eos_when_sampling():
    logits = torch.tensor([[5.0, 0.0, 0.0]]).expand(500, 3)
    torch.manual_seed(0)
    reqs = [make_request(min_tokens=1) for _ in range(500)]
    assert EOS not in Sampler()(logits, reqs).token_ids


# ------------------------------------------------------------------ logprobs


def test_logprobs_are_the_raw_log_softmax_with_rank_and_top():
    logits = random_logits(3, 100, seed=9)
    # Temperature, penalties and filters change the sampling, not the reported logprobs.
    reqs = [
        make_request(temperature=0.0, logprobs=5),
        make_request(temperature=0.7, top_k=10, logprobs=3, repetition_penalty=1.3),
        make_request(temperature=1.0, logprobs=0, seed=5),
    ]
    out = Sampler()(logits, reqs)
    raw = torch.log_softmax(logits, dim=-1)
    for row, (req, lp) in enumerate(zip(reqs, out.logprobs, strict=True)):
        token = out.token_ids[row]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[row, token].item(), abs=1e-6)
        assert lp.rank == int((raw[row] > raw[row, token]).sum()) + 1
        k = req.sampling_params.logprobs
        values, ids = raw[row].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[0].rank == 1  # greedy picks the most likely token


def test_logprobs_none_for_requests_that_did_not_ask():
    logits = random_logits(2, 50, seed=10)
    out = Sampler()(logits, [make_request(logprobs=2), make_request()])
    assert out.logprobs[0] is not None and out.logprobs[1] is None


def test_rank_of_a_sampled_unlikely_token():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    # Penalties push token 3 to the top; its raw rank is still 4.
    req = make_request(
        temperature=0.0, logprobs=2, min_tokens=1, stop_token_ids=[0, 1, 2], eos=frozenset()
    )
    lp = Sampler()(logits, [req]).logprobs[0]
    assert lp.token_id == 3
    assert lp.rank == 4
    assert [t for t, _ in lp.top] == [0, 1]
