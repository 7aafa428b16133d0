"""OpenAI request/response shapes, and the ingress's HTTP behaviour against a fake replica.

No Ray cluster: the ingress's FastAPI app runs in-process (httpx ASGI transport) with a fake
deployment handle that streams synthetic deltas, so these run in a second or two. The real
path through Ray Serve is tested in tests/test_serve_openai.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai.types
import openai.types.chat
import pytest
from rayfleet.cluster.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    TokenizeRequest,
)

# ---------------------------------------------------------------------------------------------
# request models -> SamplingParams


def chat_req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_chat_request_maps_to_sampling_params():
    p = chat_req(
        max_tokens=5, temperature=0.3, top_p=0.9, top_k=4, min_p=0.1, seed=7, stop="END",
        presence_penalty=0.5, frequency_penalty=-0.5, ignore_eos=True, min_tokens=2,
    ).to_sampling_params()  # fmt: skip
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (
        5, 0.3, 0.9, 4, 0.1, 7,
    )  # fmt: skip
    assert p.stop == ["END"] and p.ignore_eos and p.min_tokens == 2
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)
    assert p.logprobs is None


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat_req(max_tokens=5, max_completion_tokens=9).to_sampling_params().max_tokens == 9


def test_chat_without_max_tokens_runs_to_the_context_limit():
    assert chat_req().to_sampling_params().max_tokens is None


def test_chat_logprobs_and_top_logprobs():
    assert chat_req(logprobs=True).to_sampling_params().logprobs == 0
    assert chat_req(logprobs=True, top_logprobs=3).to_sampling_params().logprobs == 3
    with pytest.raises(ProtocolError) as e:
        chat_req(top_logprobs=3).to_sampling_params()
    assert e.value.param == "top_logprobs"


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"top_p": 2.0}, "top_p"),
        ({"min_p": 3.0}, "min_p"),
        ({"presence_penalty": 5}, "presence_penalty"),
    ],
)
def test_bad_sampling_values_name_the_parameter(kw, param):
    with pytest.raises(ProtocolError) as e:
        chat_req(**kw).to_sampling_params()
    assert e.value.status == 400 and e.value.param == param


def test_stream_options_need_stream():
    with pytest.raises(ProtocolError):
        chat_req(stream_options={"include_usage": True}).to_sampling_params()


def test_tools_are_refused():
    with pytest.raises(ProtocolError) as e:
        chat_req(tools=[{"type": "function", "function": {"name": "f"}}]).to_sampling_params()
    assert e.value.param == "tools"


def test_unknown_request_fields_are_ignored():
    r = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "some_future_field": 1}
    )
    assert r.to_sampling_params().n == 1


def test_content_parts_are_joined():
    r = ChatCompletionRequest(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert r.messages[0].as_template_dict() == {"role": "user", "content": "ab"}


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


def test_completion_defaults_to_16_tokens():
    assert CompletionRequest(prompt="x").to_sampling_params().max_tokens == 16


def test_empty_completion_prompt_list_is_refused():
    with pytest.raises(ProtocolError):
        CompletionRequest(prompt=[]).prompts()


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    assert (
        CompletionRequest(prompt="x", echo=True, logprobs=2).to_sampling_params().prompt_logprobs
        == 2
    )
    assert CompletionRequest(prompt="x", logprobs=2).to_sampling_params().prompt_logprobs is None
    assert CompletionRequest(prompt="x", echo=True).to_sampling_params().prompt_logprobs is None


def test_tokenize_needs_exactly_one_input():
    with pytest.raises(ProtocolError):
        TokenizeRequest().check()
    with pytest.raises(ProtocolError):
        TokenizeRequest(prompt="a", messages=[{"role": "user", "content": "b"}]).check()


# ---------------------------------------------------------------------------------------------
# The ingress app against a fake replica

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-test"
REPLY_IDS: list[int] = []  # filled from the tokenizer


class FakeStream:
    """Stands in for a DeploymentResponseGenerator."""

    def __init__(self, deltas):
        self._deltas = list(deltas)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self._deltas:
            raise StopAsyncIteration
        d = self._deltas.pop(0)
        if isinstance(d, BaseException):
            raise d
        return d

    def cancel(self):
        self.cancelled = True


class FakeReplica:
    """A handle whose replica answers every request with REPLY_IDS (one token per delta)."""

    def __init__(self, tokenizer, raise_on_generate: BaseException | None = None):
        self.tokenizer = tokenizer
        self.requests = []
        self.streams: list[FakeStream] = []
        self.raise_on_generate = raise_on_generate
        outer = self

        class _Method:
            def __init__(self, fn):
                self.remote = fn

        async def _info():
            return {"model_name": MODEL, "max_model_len": 2048, "eos_token_ids": [2]}

        self.generate = _Method(outer._generate)
        self.model_info = _Method(_info)

    def options(self, **kw):
        return self

    def _generate(self, greq):
        from rayfleet.cluster.llm_server import SampleDelta, StreamDelta
        from rayfleet.engine import Logprob

        self.requests.append(greq)
        if self.raise_on_generate is not None:
            s = FakeStream([self.raise_on_generate])
            self.streams.append(s)
            return s
        p = greq.params
        if "too long" in self.tokenizer.decode(greq.prompt):
            s = FakeStream([StreamDelta(error="prompt (9 tokens) + max_tokens (9) > 10")])
            self.streams.append(s)
            return s
        n_tok = min(p.max_tokens or len(REPLY_IDS), len(REPLY_IDS))
        deltas = []
        for k in range(n_tok):
            samples = []
            for i in range(p.n):
                tid = REPLY_IDS[k]
                lps = None
                if p.logprobs is not None:
                    lps = [
                        {
                            tid: Logprob(-0.25, 1, self.tokenizer.decode([tid])),
                            tid + 1: Logprob(-2.0, 2, self.tokenizer.decode([tid + 1])),
                            tid + 2: Logprob(-3.0, 3, self.tokenizer.decode([tid + 2])),
                        }
                    ]
                last = k == n_tok - 1
                samples.append(
                    SampleDelta(
                        i,
                        self.tokenizer.decode([tid]),
                        [tid],
                        lps,
                        ("length" if n_tok < len(REPLY_IDS) else "stop") if last else None,
                    )
                )
            prompt_lps = None
            if k == 0 and p.prompt_logprobs is not None:  # like the engine: on sample 0's first
                prompt_lps = [None] + [
                    {t: Logprob(-1.5, 4, self.tokenizer.decode([t]))} for t in greq.prompt[1:]
                ]
            deltas.append(
                StreamDelta(
                    samples=samples,
                    finished=k == n_tok - 1,
                    num_prompt_tokens=len(greq.prompt) if k == 0 else None,
                    prompt_logprobs=prompt_lps,
                    replica="replica-a" if k == 0 else None,
                )
            )
        s = FakeStream(deltas)
        self.streams.append(s)
        return s


@pytest.fixture(scope="module")
def tokenizer():
    from rayfleet.cluster.config import RayfleetConfig
    from rayfleet.cluster.ingress import load_tokenizer

    tok = load_tokenizer(RayfleetConfig())
    REPLY_IDS[:] = tok.encode(" Paris is the capital", add_special_tokens=False)
    return tok


def run_app(tokenizer, fn, server: dict | None = None, replica: FakeReplica | None = None):
    """Build an Ingress on a fake replica, call `fn(client, replica)` inside one event loop."""
    from rayfleet.cluster.ingress import Ingress, build_api

    replica = replica or FakeReplica(tokenizer)
    cfg = {"server": {"api_keys": [KEY], "max_request_body_bytes": 2048, **(server or {})}}

    async def main():
        ing = Ingress.__new__(Ingress)
        import rayfleet.cluster.ingress as ingress_mod

        orig = ingress_mod.load_tokenizer
        ingress_mod.load_tokenizer = lambda cfg: tokenizer
        try:
            await ing.__init__(replica, cfg)
        finally:
            ingress_mod.load_tokenizer = orig
        ing.ready_replicas = 1
        app = build_api(ing)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://test",
            headers={"Authorization": f"Bearer {KEY}"},
        ) as c:
            try:
                return await fn(c, replica, ing)
            finally:
                ing._poll_task.cancel()

    return asyncio.run(main())


HELLO = [{"role": "user", "content": "What is the capital of France?"}]
REPLY = " Paris is the capital"


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ")
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_response_has_openai_shape(tokenizer):
    async def fn(c, rep, ing):
        return await c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})

    r = run_app(tokenizer, fn)
    assert r.status_code == 200
    resp = openai.types.chat.ChatCompletion.model_validate(r.json())
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == len(REPLY_IDS)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_template_is_applied_and_replica_gets_token_ids(tokenizer):
    async def fn(c, rep, ing):
        await c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
        return rep.requests[0]

    greq = run_app(tokenizer, fn)
    from rayfleet.cluster.ingress import apply_chat_template

    assert greq.prompt == apply_chat_template(tokenizer, HELLO, add_generation_prompt=True)
    assert greq.prompt_text is None  # prompts are not passed on for logging by default


def test_chat_stream_chunks_and_usage(tokenizer):
    async def fn(c, rep, ing):
        return await c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": HELLO,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )

    r = run_app(tokenizer, fn)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == REPLY
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(REPLY_IDS)
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completion_n_2_logprobs_and_echo(tokenizer):
    async def fn(c, rep, ing):
        a = await c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "Q:", "n": 2, "logprobs": 2, "max_tokens": 3},
        )
        b = await c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Q:", "echo": True, "max_tokens": 2}
        )
        return a, b

    a, b = run_app(tokenizer, fn)
    resp = openai.types.Completion.model_validate(a.json())
    assert [ch.index for ch in resp.choices] == [0, 1]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 6
    echo = openai.types.Completion.model_validate(b.json())
    assert echo.choices[0].text.startswith("Q:")


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_with_logprobs_starts_with_the_prompt(tokenizer, stream):
    """OpenAI's legacy shape: the prompt's tokens first (the first with null logprob and
    null top_logprobs), then the generated ones, text offsets running through both."""
    prompt = "Q: why?"
    ids = tokenizer.encode(prompt)

    async def fn(c, rep, ing):
        body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 2}
        return await c.post("/v1/completions", json=body | {"stream": stream, "n": 2})

    r = run_app(tokenizer, fn)
    assert r.status_code == 200, r.text
    # Raw JSON: the SDK's pydantic types have no null inside token_logprobs (its client
    # builds responses without validating, as the live test in test_serve_openai shows).
    if stream:
        by_choice: dict[int, dict[str, list]] = {}
        for ch in sse_events(r.text)[:-1]:
            for choice in ch["choices"]:
                acc = by_choice.setdefault(choice["index"], {"tokens": [], "lps": [], "off": []})
                if choice["logprobs"] is not None:
                    acc["tokens"] += choice["logprobs"]["tokens"]
                    acc["lps"] += choice["logprobs"]["token_logprobs"]
                    acc["off"] += choice["logprobs"]["text_offset"]
        got = [by_choice[0], by_choice[1]]
    else:
        resp = r.json()
        got = [
            {"tokens": ch["logprobs"]["tokens"], "lps": ch["logprobs"]["token_logprobs"],
             "off": ch["logprobs"]["text_offset"]}
            for ch in resp["choices"]
        ]  # fmt: skip
        assert resp["choices"][0]["text"].startswith(prompt)
    for g in got:  # both choices of n=2 carry the prompt
        assert len(g["tokens"]) == len(ids) + 2
        assert g["lps"][0] is None and g["lps"][1 : len(ids)] == [-1.5] * (len(ids) - 1)
        assert g["lps"][len(ids) :] == [-0.25, -0.25]
        assert g["off"] == sorted(g["off"]) and g["off"][0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_responses_name_the_replica(tokenizer, stream):
    async def fn(c, rep, ing):
        body = {"model": MODEL, "max_tokens": 2, "stream": stream}
        chat = await c.post("/v1/chat/completions", json=body | {"messages": HELLO})
        cmpl = await c.post("/v1/completions", json=body | {"prompt": ["a", "b"]})
        return chat, cmpl

    chat, cmpl = run_app(tokenizer, fn)
    assert chat.status_code == cmpl.status_code == 200
    # two prompts on the same fake replica: named once
    assert chat.headers["x-rayfleet-replica"] == cmpl.headers["x-rayfleet-replica"] == "replica-a"


def test_completion_batch_prompts_index_choices(tokenizer):
    async def fn(c, rep, ing):
        return await c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2, "stream": True},
        )

    r = run_app(tokenizer, fn)
    events = sse_events(r.text)
    assert {e["choices"][0]["index"] for e in events[:-1]} == {0, 1, 2, 3}


def test_token_id_prompt_is_passed_through(tokenizer):
    async def fn(c, rep, ing):
        await c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]})
        bad = await c.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]})
        return rep.requests[0].prompt, bad

    prompt, bad = run_app(tokenizer, fn)
    assert prompt == [1, 2, 3]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_chat_logprobs_shape(tokenizer):
    async def fn(c, rep, ing):
        return await c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 2},
        )

    resp = openai.types.chat.ChatCompletion.model_validate(run_app(tokenizer, fn).json())
    content = resp.choices[0].logprobs.content
    assert len(content) == len(REPLY_IDS)
    assert content[0].logprob == -0.25
    assert [t.logprob for t in content[0].top_logprobs] == [-0.25, -2.0]
    assert content[0].bytes == list(content[0].token.encode())


def errors_of(r: httpx.Response) -> dict:
    body = r.json()
    assert list(body) == ["error"]
    return body["error"]


def test_error_statuses(tokenizer):
    async def fn(c, rep, ing):
        out = {}
        out["no_key"] = await c.post(
            "/v1/chat/completions", json={"messages": HELLO}, headers={"Authorization": ""}
        )
        out["wrong_key"] = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        out["health_no_key"] = await c.get("/health", headers={"Authorization": ""})
        out["unknown_model"] = await c.post(
            "/v1/chat/completions", json={"model": "gpt-x", "messages": HELLO}
        )
        out["too_large"] = await c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x" * 4096}
        )

        async def chunks():
            for _ in range(4):
                yield b"x" * 1024

        out["too_large_chunked"] = await c.post(
            "/v1/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        out["bad_json"] = await c.post(
            "/v1/completions", content=b"{", headers={"content-type": "application/json"}
        )
        out["missing_field"] = await c.post("/v1/chat/completions", json={"model": MODEL})
        out["bad_value"] = await c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 7}
        )
        out["too_long"] = await c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "too long"}
        )
        out["n_limit"] = await c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 99}
        )
        return out

    out = run_app(tokenizer, fn, server={"max_n": 4})
    assert out["no_key"].status_code == 401
    assert errors_of(out["no_key"])["code"] == "invalid_api_key"
    assert out["wrong_key"].status_code == 401
    assert out["health_no_key"].status_code == 200
    assert out["unknown_model"].status_code == 404
    assert errors_of(out["unknown_model"])["code"] == "model_not_found"
    assert out["too_large"].status_code == 413
    assert out["too_large_chunked"].status_code == 413
    assert out["bad_json"].status_code == 400
    assert out["missing_field"].status_code == 400
    assert errors_of(out["missing_field"])["param"] == "messages"
    assert out["bad_value"].status_code == 400
    assert errors_of(out["bad_value"])["param"] == "top_p"
    assert out["too_long"].status_code == 400
    assert "10" in errors_of(out["too_long"])["message"]
    assert out["n_limit"].status_code == 400


def test_backpressure_is_429_with_retry_after(tokenizer):
    from ray.serve.exceptions import BackPressureError

    rep = FakeReplica(tokenizer, raise_on_generate=BackPressureError(5, 5))

    async def fn(c, rep, ing):
        return await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})

    r = run_app(tokenizer, fn, server={"retry_after_s": 3}, replica=rep)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert errors_of(r)["type"] == "rate_limit_error"


def test_no_ready_replica_is_503(tokenizer):
    async def fn(c, rep, ing):
        ing.ready_replicas = 0

        async def still_none():
            ing.ready_replicas = 0

        ing._poll_replicas = still_none
        a = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        b = await c.get("/health")
        return a, b

    a, b = run_app(tokenizer, fn)
    assert a.status_code == 503 and b.status_code == 503
    assert errors_of(a)["type"] == "service_unavailable"


def test_api_keys_compare_every_key(tokenizer):
    async def fn(c, rep, ing):
        return [
            ing.authorized(b"Bearer " + KEY.encode()),
            ing.authorized(b"bearer " + KEY.encode()),
            ing.authorized(KEY.encode()),
            ing.authorized(b"Bearer " + KEY.encode() + b"x"),
            ing.authorized(None),
        ]

    assert run_app(tokenizer, fn) == [True, True, False, False, False]


def test_models_tokenize_detokenize(tokenizer):
    async def fn(c, rep, ing):
        m = await c.get("/v1/models")
        t = await c.post("/tokenize", json={"prompt": "Hello world"})
        tc = await c.post("/tokenize", json={"messages": HELLO})
        d = await c.post("/detokenize", json={"tokens": t.json()["tokens"]})
        v = await c.get("/version")
        return m, t, tc, d, v

    m, t, tc, d, v = run_app(tokenizer, fn)
    assert m.json()["data"][0]["id"] == MODEL
    assert t.json()["count"] == len(t.json()["tokens"]) > 0
    assert tc.json()["count"] > t.json()["count"]
    assert d.json() == {"prompt": "Hello world"}
    assert v.json()["version"]


def test_client_disconnect_cancels_the_replica_stream(tokenizer):
    async def fn(c, rep, ing):
        req = c.build_request(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 4},
        )
        resp = await c.send(req, stream=True)
        async for _ in resp.aiter_bytes():
            break
        await resp.aclose()
        await asyncio.sleep(0.05)
        return rep.streams[0]

    stream = run_app(tokenizer, fn)
    assert stream.cancelled
