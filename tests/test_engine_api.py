"""LLMEngine / AsyncLLMEngine / LLM behaviour on the real default model: input checks, stops,
aborts, streaming. Bad input raises a clear error and changes nothing else."""

from __future__ import annotations

import asyncio

import pytest
from rayfleet.engine import LLM, AsyncLLMEngine, EngineConfig, SamplingParams, merge_delta
from rayfleet.engine.default_model import default_model_path


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        model=default_model_path(),
        dtype="float32",
        device="cpu",
        num_kv_blocks=256,
        max_model_len=512,
    )


def free_blocks(llm: LLM) -> int:
    return llm.engine.kv.num_free_blocks


# ---- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(n=0), "n must"),
        (dict(logprobs=99), "logprobs"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_is_rejected_with_numbers(llm):
    before = free_blocks(llm)
    with pytest.raises(ValueError, match=r"600 tokens.*512"):
        llm.generate([{"prompt_token_ids": [1] * 600}], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) \+ max_tokens \(600\)"):
        llm.generate([{"prompt_token_ids": [1] * 10}], SamplingParams(max_tokens=600))
    assert free_blocks(llm) == before and not llm.engine.has_unfinished_requests()


def test_out_of_vocabulary_and_empty_prompts_are_rejected(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [5, 10**9]}])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}])


def test_one_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", {"prompt_token_ids": [-1]}], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["still serving"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


# ---- stops -----------------------------------------------------------------------
def test_max_tokens_min_tokens_and_finish_reasons(llm):
    out = llm.generate(["Count: 1, 2, 3,"], SamplingParams(max_tokens=5, temperature=0))[0]
    o = out.outputs[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length"
    out = llm.generate(
        ["What is 2+2?"],
        SamplingParams(max_tokens=40, min_tokens=30, temperature=0, stop_token_ids=[]),
    )[0].outputs[0]
    assert len(out.token_ids) >= 30


def test_stop_string_is_cut_and_not_emitted(llm):
    params = SamplingParams(max_tokens=30, temperature=0)
    full = llm.generate(["1, 2, 3, 4,"], params)[0].outputs[0].text
    assert " 7" in full, full
    stopped = llm.generate(
        ["1, 2, 3, 4,"], SamplingParams(max_tokens=30, temperature=0, stop=[" 7"])
    )[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " 7"
    assert stopped.text == full[: full.index(" 7")]
    kept = llm.generate(
        ["1, 2, 3, 4,"],
        SamplingParams(max_tokens=30, temperature=0, stop=[" 7"], include_stop_str_in_output=True),
    )[0]
    assert kept.outputs[0].text == full[: full.index(" 7") + 2]


def test_stop_token_id_ends_generation(llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ids = llm.generate(["1, 2, 3, 4,"], params)[0].outputs[0].token_ids
    stop_id = ids[3]
    out = llm.generate(
        ["1, 2, 3, 4,"],
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]),
    )[0].outputs[0]
    assert out.token_ids == ids[: ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_logprobs_are_returned_with_ranks(llm):
    out = llm.generate(["The sky is"], SamplingParams(max_tokens=4, temperature=0, logprobs=5))[
        0
    ].outputs[0]
    assert len(out.logprobs) == 4
    for tid, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tid in entry and entry[tid].rank == 1  # greedy picks the top token
        assert len(entry) == 5
        assert all(lp.logprob <= 0 for lp in entry.values())
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True)), rel=1e-5
    )


def test_chat_uses_the_template(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=20, temperature=0),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


# ---- abort -------------------------------------------------------------------------
def test_abort_at_any_point_frees_every_block(llm):
    engine = llm.engine
    idle = free_blocks(llm)
    for steps_before_abort in (0, 1, 3):
        engine.add_request(
            "victim",
            "A long story begins here. " * 8,
            SamplingParams(max_tokens=50, n=2, ignore_eos=True),
        )
        for _ in range(steps_before_abort):
            engine.step()
        final = engine.abort_request("victim")
        assert final is None or final.finished
        assert free_blocks(llm) == idle
        assert not engine.has_unfinished_requests()
    assert engine.abort_request("no-such-request") is None


def test_duplicate_request_id_is_rejected(llm):
    engine = llm.engine
    engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    engine.abort_request("dup")


# ---- async engine ------------------------------------------------------------------
def test_async_engine_streams_deltas_and_aborts_on_cancel():
    engine = AsyncLLMEngine.from_config(
        EngineConfig(model=default_model_path(), dtype="float32", device="cpu", num_kv_blocks=128)
    )

    async def main():
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        acc = None
        n_items = 0
        async for delta in engine.generate("Hello there", params, "s1"):
            acc = merge_delta(acc, delta)
            n_items += 1
        assert acc.finished and len(acc.outputs[0].token_ids) == 12
        assert acc.metrics is not None and acc.metrics.first_token_time is not None

        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in engine.generate("x", SamplingParams(max_tokens=10**6), "bad"):
                pass

        idle = engine.engine.kv.num_total_blocks

        async def consume():
            async for _ in engine.generate(
                "Long " * 40, SamplingParams(max_tokens=200, ignore_eos=True), "s2"
            ):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.engine.kv.num_free_blocks == idle:
                break
        assert engine.engine.kv.num_free_blocks == idle
        await engine.shutdown()

    asyncio.run(main())


def test_async_engine_delivers_each_stream_its_own_tokens_across_event_loops(llm):
    """A step's deltas go out in one batch per event loop: streams on two loops (two
    threads), several per loop, each get exactly the greedy tokens LLM.generate gives."""
    import threading

    prompts = [f"Item {i}: the colour of the sky is" for i in range(6)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    engine = AsyncLLMEngine.from_config(
        EngineConfig(model=default_model_path(), dtype="float32", device="cpu", num_kv_blocks=128)
    )
    got: dict[int, list[int]] = {}

    async def stream(i: int) -> None:
        acc = None
        async for delta in engine.generate(prompts[i], params, f"loop-{i}"):
            acc = merge_delta(acc, delta)
        got[i] = list(acc.outputs[0].token_ids)

    async def several(indices) -> None:
        await asyncio.gather(*(stream(i) for i in indices))

    other = threading.Thread(target=lambda: asyncio.run(several([1, 3, 5])))
    other.start()
    asyncio.run(several([0, 2, 4]))
    other.join(60)
    engine.shutdown_sync()
    assert {i: got[i] for i in range(6)} == {i: list(w) for i, w in enumerate(want)}


def test_load_snapshot_counts_requests_the_engine_thread_has_not_seen_yet():
    """A request handed to `generate` is counted at once: as not yet in the stats while the
    engine thread has not applied it (held off here by taking its lock), in the stats after
    its step. The request router relies on it to know what a replica's report covers."""
    engine = AsyncLLMEngine.from_config(
        EngineConfig(model=default_model_path(), dtype="float32", device="cpu", num_kv_blocks=128)
    )

    async def main():
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        stats, n, tokens = engine.load_snapshot()
        assert (stats.num_running + stats.num_waiting, n, tokens) == (0, 0, 0)
        prompts = {"a": list(range(100, 120)), "b": list(range(200, 230))}

        async def run(rid):
            async for _ in engine.generate({"prompt_token_ids": prompts[rid]}, params, rid):
                pass

        with engine._engine_lock:  # the engine thread cannot apply ops or step
            tasks = [asyncio.create_task(run(r)) for r in prompts]
            await asyncio.sleep(0.2)
            stats, n, tokens = engine.load_snapshot()
            assert (stats.num_running + stats.num_waiting, n, tokens) == (0, 2, 50)
        await asyncio.gather(*tasks)
        stats, n, tokens = engine.load_snapshot()
        assert (stats.num_running + stats.num_waiting, n, tokens) == (0, 0, 0)
        await engine.shutdown()

    asyncio.run(main())


def test_async_engine_builds_its_engine_in_the_engine_thread(monkeypatch):
    """The model is loaded where it is stepped: one OpenMP master thread in the process
    (a second one makes libgomp stop spin-waiting, ~2.5x slower batch-1 decode on 2 cores;
    see `async_llm_engine`'s docstring). The builder must run on the engine thread."""
    import threading

    import rayfleet.engine.async_llm_engine as ale

    built_on: list[str] = []
    real = ale.LLMEngine

    def recording(config):
        built_on.append(threading.current_thread().name)
        return real(config)

    monkeypatch.setattr(ale, "LLMEngine", recording)
    engine = AsyncLLMEngine.from_config(
        EngineConfig(model=default_model_path(), dtype="float32", device="cpu", num_kv_blocks=32)
    )
    try:
        assert built_on == [engine._thread.name] == ["rayfleet-engine"]
        assert engine.get_stats().num_total_blocks == 32

        async def one():
            params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
            return [d async for d in engine.generate("Hi", params, "t")]

        assert asyncio.run(one())[-1].finished
    finally:
        engine.shutdown_sync()


def test_async_engine_that_fails_to_build_raises_and_leaves_no_thread():
    import threading

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match="max_model_len"):
        AsyncLLMEngine.from_config(
            EngineConfig(model=default_model_path(), device="cpu", max_model_len=10**7)
        )
    assert not [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
