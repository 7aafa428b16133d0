"""Continuous batching, chunked prefill, prefix hits and preemption never change a greedy output.

Every test compares token ids of the real default model (SmolLM2-135M-Instruct, float32)
run under some scheduling condition with the same prompts run one at a time.
"""

from __future__ import annotations

import pytest
from rayfleet.engine import LLM, SamplingParams
from rayfleet.engine.default_model import default_model_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Explain the theory of relativity in simple terms. The theory says that",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):",
    "A",
    "List three fruits:",
    "In 1492, Columbus",
    "The best way to learn a new programming language is to start by writing small programs, then",
    "Q: What is the boiling point of water?\nA:",
    "Roses are red, violets are blue,",
    "SELECT * FROM users WHERE",
    "My favourite colour is",
    "Translate to French: Good morning, how are you today? ->",
]
MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_llm(**overrides) -> LLM:
    kwargs = dict(dtype="float32", device="cpu", num_kv_blocks=512, block_size=16)
    kwargs.update(overrides)
    return LLM(model=default_model_path(), **kwargs)


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    """Each prompt generated on its own, with prefix caching off: the reference."""
    llm = make_llm(enable_prefix_caching=False)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_sixteen_prompts_batched_with_chunked_prefill_match_alone(alone):
    # A budget of 24 tokens forces prompts to be chunked and requests to join mid-flight.
    llm = make_llm(max_num_batched_tokens=24, max_num_seqs=16, enable_prefix_caching=False)
    got = token_ids(llm.generate(PROMPTS, GREEDY))
    assert [len(t) for t in got] == [MAX_TOKENS] * len(PROMPTS)
    for i, (g, a) in enumerate(zip(got, alone, strict=True)):
        assert g == a, f"prompt {i} diverged under continuous batching"
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_prefix_cache_hits_do_not_change_output(alone):
    llm = make_llm(max_num_batched_tokens=64)
    first = token_ids(llm.generate(PROMPTS, GREEDY))
    hits_before = llm.engine.get_stats().prefix_cache_hits
    second = token_ids(llm.generate(PROMPTS, GREEDY))
    assert llm.engine.get_stats().prefix_cache_hits > hits_before, "the second pass hit nothing"
    assert first == alone
    assert second == alone


def test_shared_system_prompt_prefix_hits_match_alone():
    system = "You are a helpful assistant. Answer briefly and precisely, without small talk. " * 3
    prompts = [system + q for q in ("What is 2+2?", "Name a colour.", "Who wrote Hamlet?")]
    ref = make_llm(enable_prefix_caching=False)
    expected = [token_ids(ref.generate([p], GREEDY))[0] for p in prompts]
    llm = make_llm(max_num_batched_tokens=32)
    got = token_ids(llm.generate(prompts, GREEDY))
    assert llm.engine.get_stats().prefix_cache_hits >= 2 * 16
    assert got == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forced_preemption_does_not_change_output(alone, mode):
    # 24 blocks of 4 tokens cannot hold 16 running requests: the newest get preempted.
    llm = make_llm(
        num_kv_blocks=24,
        block_size=4,
        max_num_batched_tokens=64,
        max_num_seqs=16,
        preemption_mode=mode,
    )
    got = token_ids(llm.generate(PROMPTS, GREEDY))
    assert llm.engine.get_stats().num_preemptions > 0, "the pool was large enough: no preemption"
    assert got == alone
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_n_samples_share_the_prompt_blocks_and_are_reproducible():
    llm = make_llm()
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    prompt = "Write a short poem about the sea. " * 4  # several full blocks
    out = llm.generate([prompt], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "samples should differ"
    # samples 1 and 2 waited for sample 0's prompt blocks and hit them
    n_full = len(out.prompt_token_ids) // 16
    assert llm.engine.get_stats().prefix_cache_hits >= 2 * n_full * 16
    again = llm.generate([prompt], params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_seeded_sampling_is_independent_of_the_batch():
    llm = make_llm(max_num_batched_tokens=32)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16)
    alone_out = llm.generate(["Tell me a story:"], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16)
    batch = llm.generate(["Hello", "Tell me a story:", "Numbers: 1 2 3"], [others, seeded, others])
    assert batch[1].outputs[0].token_ids == alone_out
