"""Prompt logprobs (`SamplingParams.prompt_logprobs`, OpenAI's echo + logprobs) against
transformers on the same weights, and unchanged by chunked prefill, a prefix-cache hit,
preemption and n > 1."""

from __future__ import annotations

import math

import pytest
import torch
from rayfleet.engine import LLM, SamplingParams
from rayfleet.engine.default_model import default_model_path

# float32 on both sides; logprobs of a 49k vocabulary differ by summation order only.
ATOL = 2e-4
PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Roses are red, violets are blue, sugar is sweet, and so",
]
K = 3


def make_llm(**overrides) -> LLM:
    kwargs = dict(dtype="float32", device="cpu", num_kv_blocks=256, block_size=16)
    kwargs.update(overrides)
    return LLM(model=default_model_path(), **kwargs)


@pytest.fixture(scope="module")
def hf_reference():
    """Per prompt: token ids and transformers' log-softmax at every position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    llm = make_llm()
    out = []
    for text in PROMPTS:
        ids = llm.tokenizer.encode(text, add_special_tokens=True)
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float()
        out.append((ids, torch.log_softmax(logits, dim=-1)))
    return out


def params(**kw) -> SamplingParams:
    base = dict(temperature=0.0, max_tokens=4, prompt_logprobs=K, ignore_eos=True)
    base.update(kw)
    return SamplingParams(**base)


def check(prompt_lps, ids, ref) -> None:
    assert len(prompt_lps) == len(ids)
    assert prompt_lps[0] is None
    for t in range(1, len(ids)):
        entry, want = prompt_lps[t], ref[t - 1]
        tok = ids[t]
        assert tok in entry, f"position {t}: the prompt token itself is missing"
        assert math.isclose(entry[tok].logprob, want[tok].item(), abs_tol=ATOL)
        # its rank, up to near-ties within the tolerance (deep in a 49k vocabulary's tail)
        v = want[tok].item()
        assert (
            int((want > v + ATOL).sum()) + 1 <= entry[tok].rank <= int((want > v - ATOL).sum()) + 1
        )
        top = want.topk(K)
        ranked = sorted((lp.rank, tid) for tid, lp in entry.items() if tid in top.indices.tolist())
        assert [tid for _, tid in ranked][:K] == top.indices.tolist()
        for tid, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert math.isclose(entry[tid].logprob, v, abs_tol=ATOL)
        assert entry[tok].decoded_token is not None


def run(llm: LLM, hf_reference, sp: SamplingParams):
    prompts = [{"prompt_token_ids": ids} for ids, _ in hf_reference]
    return llm.generate(prompts, sp)


def test_prompt_logprobs_match_transformers(hf_reference):
    outs = run(make_llm(), hf_reference, params())
    for out, (ids, ref) in zip(outs, hf_reference, strict=True):
        check(out.prompt_logprobs, ids, ref)


def test_without_prompt_logprobs_there_are_none(hf_reference):
    outs = run(make_llm(), hf_reference, params(prompt_logprobs=None))
    assert all(o.prompt_logprobs is None for o in outs)


@pytest.mark.parametrize(
    "condition",
    ["chunked-prefill", "prefix-cache-hit", "preemption", "n=2"],
)
def test_prompt_logprobs_and_tokens_unchanged_by_scheduling(hf_reference, condition):
    plain = [o.outputs[0].token_ids for o in run(make_llm(), hf_reference, params(max_tokens=12))]
    sp = params(max_tokens=12)
    if condition == "chunked-prefill":
        llm = make_llm(max_num_batched_tokens=7)
    elif condition == "prefix-cache-hit":
        llm = make_llm()
        run(llm, hf_reference, params(prompt_logprobs=None, max_tokens=1))  # cache the prompts
        before = llm.engine.kv.stats.hits
        outs = run(llm, hf_reference, sp)
        # the prompt logprobs need every position computed: no hit for their sample
        assert llm.engine.kv.stats.hits == before
    elif condition == "preemption":
        llm = make_llm(num_kv_blocks=12, block_size=4, max_num_batched_tokens=16)
    else:
        llm = make_llm()
        sp = params(max_tokens=12, n=2)
    if condition != "prefix-cache-hit":
        outs = run(llm, hf_reference, sp)
    if condition == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    for out, (ids, ref), want in zip(outs, hf_reference, plain, strict=True):
        check(out.prompt_logprobs, ids, ref)
        assert all(o.token_ids == want for o in out.outputs)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_total_blocks  # nothing leaked


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_is_rejected(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)


def test_prompt_logprobs_in_row_slices_match(hf_reference, monkeypatch):
    """The LM head runs over prompt rows in slices (bounded memory); slices of 5 rows,
    crossing chunk and request boundaries, give the same result."""
    import rayfleet.engine.model_runner as mr

    monkeypatch.setattr(mr, "PROMPT_LOGPROBS_ROWS", 5)
    outs = run(make_llm(max_num_batched_tokens=24), hf_reference, params())
    for out, (ids, ref) in zip(outs, hf_reference, strict=True):
        check(out.prompt_logprobs, ids, ref)
