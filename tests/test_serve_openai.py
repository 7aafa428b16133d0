"""The OpenAI API through a real local Ray Serve cluster, called with the official client.

One Ray cluster for the module, confined to loopback (a private network namespace, entered
by the fixture itself; needs root) with HOME in a temporary folder and Ray token auth off.
Run: `pytest -m ray tests/test_serve_openai.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.ray

API_KEY = "test-key"
MAX_MODEL_LEN = 512
BODY_LIMIT = 64 * 1024
MAIN_APP = "rayfleet"


@pytest.fixture(scope="module")
def cluster():
    from rayfleet.cluster.testing import deploy_app, local_serve_cluster

    # The main app is called on its ingress replica's own port (direct ingress, as `rayfleet
    # serve` sets it up); the side apps through Serve's proxy (as under KubeRay).
    with local_serve_cluster(
        metrics_export=True, prefix="rfoai", skip=pytest.skip, direct_ingress=True
    ) as c:
        base = deploy_app(
            {
                "model": {"path": c.model_path},
                "engine": {
                    "device": "cpu",
                    "dtype": "float32",
                    "num_kv_blocks": 256,
                    "max_model_len": MAX_MODEL_LEN,
                    "max_num_seqs": 40,
                },
                "replica": {"max_ongoing_requests": 64},
                "server": {"api_keys": [API_KEY], "max_request_body_bytes": BODY_LIMIT},
            },
            MAIN_APP,
        )
        assert base is not None and base != c.base
        yield {
            "base": base,
            "proxy": c.base,
            "model_path": c.model_path,
            "metrics": c.metrics,
            "temp_dir": c.temp_dir,
            "home": c.home,
        }


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster["base"] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def engine_stats(app: str = MAIN_APP) -> dict:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=app).get_stats.remote().result()


def wait_idle(idle_free: int, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = engine_stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == idle_free:
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.2)


HELLO = [{"role": "user", "content": "What is the capital of France?"}]


# ---------------------------------------------------------------------------------------------
# happy paths


def test_models_lists_the_served_model(client, cluster):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].max_model_len == MAX_MODEL_LEN


def test_health_and_version_need_no_key(cluster):
    r = httpx.get(cluster["base"] + "/health")
    assert r.status_code == 200 and r.json()["ready_replicas"] == 1
    r = httpx.get(cluster["base"] + "/version")
    assert r.status_code == 200 and r.json()["version"]


def test_chat_usage_equals_engine_token_counts(client, model_name, cluster):
    before = engine_stats()
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=12, temperature=0
    )
    after = engine_stats()
    tok = httpx.post(
        cluster["base"] + "/tokenize",
        json={"messages": HELLO},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == tok["count"]
    gen = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert r.usage.completion_tokens == gen
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client, model_name):
    full = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_ends_with_done(cluster, model_name):
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        cluster["base"] + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": "client-rid-1"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        # One x-request-id, the client's (Serve's proxy echoes it), not a second of ours.
        assert r.headers.get_list("x-request-id") == ["client-rid-1"]
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_completions_streaming_and_not_agree(client, model_name):
    kw = dict(model=model_name, prompt="Once upon a time", max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    parts = list(client.completions.create(**kw, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert full.usage.completion_tokens == 10 or full.choices[0].finish_reason == "stop"


def test_completions_token_id_prompt_and_echo(client, model_name, cluster):
    ids = httpx.post(
        cluster["base"] + "/tokenize",
        json={"prompt": "The sky is"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()["tokens"]
    by_text = client.completions.create(
        model=model_name, prompt="The sky is", max_tokens=6, temperature=0
    )
    by_ids = client.completions.create(
        model=model_name, prompt=ids, max_tokens=6, temperature=0, echo=True
    )
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == "The sky is" + by_text.choices[0].text


def test_n_2_gives_two_choices(client, model_name):
    r = client.completions.create(
        model=model_name, prompt="My favourite colour is", max_tokens=8, n=2, temperature=1.0,
        seed=1,
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.text for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 16
    chat = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=6, n=2, temperature=1.0
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]
    stream = list(
        client.chat.completions.create(
            model=model_name, messages=HELLO, max_tokens=6, n=2, temperature=1.0, stream=True
        )
    )
    assert {c.choices[0].index for c in stream if c.choices} == {0, 1}


def test_stop_string_ends_the_output(client, model_name):
    base = (
        client.completions.create(
            model=model_name, prompt="Once upon a time", max_tokens=12, temperature=0
        )
        .choices[0]
        .text
    )
    words = base.split()
    assert len(words) >= 3
    stop = " " + words[2]
    r = client.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    assert stop not in r.choices[0].text


def test_chat_logprobs(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token  # greedy: the sampled token is the top one


def test_completion_logprobs(client, model_name):
    r = client.completions.create(
        model=model_name, prompt="The sky is", max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    assert all(len(t) == 3 for t in lp.top_logprobs)


def test_greedy_http_output_equals_offline_engine(client, model_name, cluster):
    from rayfleet.engine import LLM, SamplingParams

    llm = LLM(cluster["model_path"], num_kv_blocks=32, max_model_len=MAX_MODEL_LEN, device="cpu",
              dtype="float32")  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0)
    offline_chat = llm.chat(HELLO, params)[0].outputs[0]
    offline_text = llm.generate("Once upon a time", params)[0].outputs[0]
    del llm
    http_chat = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=24, temperature=0
    )
    http_text = client.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=24, temperature=0
    )
    assert http_chat.choices[0].message.content == offline_chat.text
    assert http_chat.usage.completion_tokens == len(offline_chat.token_ids)
    assert http_text.choices[0].text == offline_text.text


def test_responses_name_the_replica_through_the_proxy(cluster, model_name):
    from ray import serve

    status = serve.status().applications[MAIN_APP].deployments["LLMServer"]
    assert status.status == "HEALTHY"
    for stream in (False, True):
        r = httpx.post(
            cluster["base"] + "/v1/completions",
            json={"model": model_name, "prompt": "Hi", "max_tokens": 2, "stream": stream},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        assert r.status_code == 200
        # the replica's Serve id (one replica in this module)
        assert r.headers["x-rayfleet-replica"] and "," not in r.headers["x-rayfleet-replica"]


def test_echo_with_logprobs_gives_the_engines_prompt_logprobs(client, model_name, cluster):
    """echo + logprobs through HTTP: the prompt's tokens first (the first with a null
    logprob), their logprobs those of the offline engine (checked against transformers in
    tests/test_prompt_logprobs.py), then the generated tokens."""
    from rayfleet.engine import LLM, SamplingParams

    prompt = "The capital of France is Paris, and the capital of Italy is"
    llm = LLM(cluster["model_path"], num_kv_blocks=32, max_model_len=MAX_MODEL_LEN, device="cpu",
              dtype="float32")  # fmt: skip
    offline = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2))
    plps, ids = offline[0].prompt_logprobs, offline[0].prompt_token_ids
    del llm
    r = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 3 == r.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(plps[t][ids[t]].logprob, abs=1e-4)
        assert len(lp.top_logprobs[t]) == 2
    assert all(x is not None for x in lp.token_logprobs[len(ids) :])


def test_32_concurrent_streams_complete_with_the_right_lengths(cluster, model_name):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
        stream = await c.completions.create(
            model=model_name,
            prompt=f"Story number {i}:",
            max_tokens=16,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces = 0
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                pieces += 1
            if chunk.usage is not None:
                usage = chunk.usage
        return pieces, usage.completion_tokens

    async def main():
        c = openai.AsyncOpenAI(
            base_url=cluster["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=300
        )
        try:
            return await asyncio.gather(*(one(c, i) for i in range(32)))
        finally:
            await c.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(n == 16 for _, n in results)
    assert all(p >= 1 for p, _ in results)


def ingress_debug(app: str = MAIN_APP) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name=app).router_debug.remote().result()


def test_tokens_travel_on_the_token_channel_and_without_it_alike(cluster, model_name):
    """The main app's replicas stream over the ingress's token channel (the default); a side
    app with `server.token_channel: false` streams as Serve's handle items. Both give the
    same greedy tokens, streamed and not."""
    from ray import serve

    main = ingress_debug()["token_channel"]
    assert main["streams_opened"] >= 32  # the 32 concurrent streams above went this way
    assert main["open_streams"] == 0 and main["rejected_connections"] == 0
    _deploy_side_app("nochan", "/nochan", {"num_replicas": 1}, cluster, token_channel=False)
    try:
        assert ingress_debug("nochan")["token_channel"] is None
        side = openai.OpenAI(base_url=cluster["proxy"] + "/nochan/v1", api_key="-", max_retries=0)
        main_client = openai.OpenAI(base_url=cluster["base"] + "/v1", api_key=API_KEY)
        kw = {"model": model_name, "prompt": "The river", "max_tokens": 20, "temperature": 0}
        outs = []
        for c in (main_client, side):
            full = c.completions.create(**kw).choices[0].text
            streamed = "".join(
                ch.choices[0].text for ch in c.completions.create(**kw, stream=True) if ch.choices
            )
            assert streamed == full
            outs.append(full)
        assert outs[0] == outs[1] and outs[0]
    finally:
        serve.delete("nochan")


def test_client_disconnect_aborts_and_frees_blocks(cluster, model_name):
    idle = wait_idle(engine_stats()["num_total_blocks"], timeout_s=10)
    idle_free = idle["num_free_blocks"]
    body = {
        "model": model_name,
        "prompt": "Write a very long story about a dragon.",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as h:
        with h.stream(
            "POST",
            cluster["base"] + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got >= 3:
                    break
            busy = engine_stats()
            assert busy["num_running"] == 1
            assert busy["num_free_blocks"] < idle_free
    after = wait_idle(idle_free)
    assert after["num_running"] == 0
    assert after["num_free_blocks"] == idle_free


# ---------------------------------------------------------------------------------------------
# errors


def _err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_400_prompt_plus_max_tokens_beyond_context(client, model_name):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(
            model=model_name, prompt="hello " * 100, max_tokens=MAX_MODEL_LEN, temperature=0
        )
    msg = ei.value.body["message"]
    assert str(MAX_MODEL_LEN) in msg


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_400_invalid_parameters(cluster, model_name, extra, param):
    r = httpx.post(
        cluster["base"] + "/v1/completions",
        json={"model": model_name, "prompt": "hi", **extra},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 400
    e = _err(r)
    assert e["type"] == "invalid_request_error"
    assert e["param"] == param


def test_400_malformed_json(cluster):
    r = httpx.post(
        cluster["base"] + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 400
    _err(r)


def test_401_without_or_with_a_wrong_key(cluster, model_name):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(
            cluster["base"] + "/v1/chat/completions",
            json={"model": model_name, "messages": HELLO},
            headers=headers,
        )
        assert r.status_code == 401
        assert _err(r)["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=cluster["base"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=2)
    assert ei.value.body["code"] == "model_not_found"


def test_413_body_over_the_limit(cluster, model_name):
    r = httpx.post(
        cluster["base"] + "/v1/completions",
        json={"model": model_name, "prompt": "x" * (BODY_LIMIT + 10)},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 413
    assert _err(r)["code"] == "request_too_large"


def test_tokenize_detokenize_round_trip(cluster):
    h = {"Authorization": f"Bearer {API_KEY}"}
    t = httpx.post(cluster["base"] + "/tokenize", json={"prompt": "Hello world"}, headers=h)
    assert t.status_code == 200 and t.json()["count"] == len(t.json()["tokens"])
    assert t.json()["max_model_len"] == MAX_MODEL_LEN
    d = httpx.post(cluster["base"] + "/detokenize", json={"tokens": t.json()["tokens"]}, headers=h)
    assert d.json()["prompt"] == "Hello world"
    bad = httpx.post(cluster["base"] + "/detokenize", json={"tokens": [10**9]}, headers=h)
    assert bad.status_code == 400


def _deploy_side_app(
    name: str, prefix: str, replica: dict, cluster, wait: bool = True, token_channel: bool = True
) -> str:
    from rayfleet.cluster.testing import deploy_app

    config = {
        "app_name": name,
        "model": {"path": cluster["model_path"]},
        "engine": {"device": "cpu", "num_kv_blocks": 64, "max_model_len": 256},
        "replica": replica,
        "server": {"token_channel": token_channel},
    }
    deploy_app(config, name, route_prefix=prefix, wait=wait)
    return cluster["proxy"] + prefix


def _wait_for_status(url: str, status: int, timeout_s: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(url, timeout=5)
        except httpx.TimeoutException:  # the ingress replica is still starting
            r = None
        if r is not None and (r.status_code == status or time.monotonic() > deadline):
            return r
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.5)


def test_503_when_no_replica_is_ready(cluster, model_name):
    from ray import serve

    # The replica asks for a resource no node has: it never starts, the ingress does.
    replica = {"num_replicas": 1, "resources": {"custom": {"no-such-resource": 1}}}
    base = _deploy_side_app("norep", "/norep", replica, cluster, wait=False)
    try:
        r = _wait_for_status(base + "/health", 503)
        assert r.status_code == 503
        _err(r)
        r = httpx.post(
            base + "/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 2}
        )
        assert r.status_code == 503
        assert _err(r)["type"] == "service_unavailable"
    finally:
        serve.delete("norep")


def test_429_with_retry_after_when_the_queue_is_full(cluster, model_name):
    from ray import serve

    base = _deploy_side_app(
        "tiny",
        "/tiny",
        {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
        cluster,
    )
    body = {
        "model": model_name,
        "prompt": "Tell me a story",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }

    async def main():
        async with httpx.AsyncClient(timeout=60) as h:
            # Two streams fill the replica (1 ongoing) and the queue (1); the third is refused.
            async def hold(ready: asyncio.Event):
                async with h.stream("POST", base + "/v1/completions", json=body) as r:
                    ready.set()
                    async for _ in r.aiter_lines():
                        await asyncio.sleep(0)

            first = asyncio.Event()
            t1 = asyncio.create_task(hold(first))
            await asyncio.wait_for(first.wait(), 30)
            t2 = asyncio.create_task(
                h.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 50})
            )
            await asyncio.sleep(1.0)
            r = await h.post(base + "/v1/completions", json={**body, "stream": False})
            t1.cancel()
            t2.cancel()
            await asyncio.gather(t1, t2, return_exceptions=True)
            return r

    try:
        r = asyncio.run(main())
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert _err(r)["type"] == "rate_limit_error"
    finally:
        serve.delete("tiny")


# ---------------------------------------------------------------------------------------------
# observability (last: earlier tests produced the traffic)


def test_request_log_lines_without_prompts(cluster):
    logs = Path(cluster["temp_dir"]) / "session_latest" / "logs" / "serve"
    deadline = time.monotonic() + 10
    records = []
    while time.monotonic() < deadline and not records:
        for f in logs.glob("replica_rayfleet_LLMServer_*.log"):
            for line in f.read_text(errors="replace").splitlines():
                if "rayfleet.request " in line:
                    records.append(json.loads(line.split("rayfleet.request ", 1)[1]))
        time.sleep(0.5)
    assert records
    rec = records[0]
    for key in ("request_id", "model", "replica", "prompt_tokens", "output_tokens", "ttft_s",
                "total_s", "finish_reason"):  # fmt: skip
        assert key in rec
    assert all("prompt" not in r for r in records)
    assert any(r["finish_reason"] == "abort" for r in records)  # the disconnected client


def test_metrics_reach_the_prometheus_export(cluster):
    want = [
        "ray_rayfleet_num_requests_running",
        "ray_rayfleet_kv_cache_usage_perc",
        "ray_rayfleet_generation_tokens_total",
        "ray_rayfleet_prompt_tokens_total",
        "ray_rayfleet_request_success_total",
        "ray_rayfleet_time_to_first_token_seconds_bucket",
        "ray_rayfleet_inter_token_latency_seconds_bucket",
        "ray_rayfleet_e2e_request_latency_seconds_bucket",
        "ray_rayfleet_request_queue_time_seconds_bucket",
    ]
    deadline = time.monotonic() + 40
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(cluster["metrics"], timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    line = next(ln for ln in text.splitlines() if ln.startswith("ray_rayfleet_generation_tokens"))
    assert 'model_name="SmolLM2-135M-Instruct"' in line and "replica=" in line
