"""The `rayfleet bench serve` workloads under Locust, for soak and ramp tests.

Streaming-aware: every request streams (SSE) and Locust's statistics get three entries
per endpoint: the request itself (its response time is the end-to-end latency, not the
time to the headers), `TTFT` (time to the first text chunk) and `TPOT` (time per output
token after the first, from the server's usage count).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless \
        -u 32 -r 4 -t 10m --workload shared-prefix --tokenizer PATH --csv out/soak

Workload options (same meaning as `rayfleet bench serve`): --workload, --tokenizer,
--endpoint, --model, --api-key, --input-len, --output-len, --range-ratio, --num-groups,
--prompts-per-group, --prefix-len, --suffix-len, --turns, --system-prompt-len,
--dataset-path, --pool-size, --seed, --no-ignore-eos, --think-time-ms.

Ramp: set RAYFLEET_LOCUST_STAGES="60:8:2,300:32:4,360:0:8" (end second : users :
spawn rate, per stage) and the stage shape replaces -u/-r/-t.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from types import SimpleNamespace

from locust import HttpUser, LoadTestShape, between, events, task
from rayfleet.loadtests.client import is_chat_endpoint
from rayfleet.loadtests.workloads import (
    WORKLOADS,
    build_workload,
    conversation_messages,
    load_tokenizer,
    render_chat,
)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    g = parser.add_argument_group("rayfleet workload")
    g.add_argument("--workload", choices=WORKLOADS, default="random")
    g.add_argument("--tokenizer", default=None, help="default: the default model's")
    g.add_argument("--endpoint", default="/v1/completions")
    g.add_argument("--model", default=None, help="default: the server's first model")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    g.add_argument("--input-len", type=int, default=256)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--range-ratio", type=float, default=0.0)
    g.add_argument("--num-groups", type=int, default=8)
    g.add_argument("--prompts-per-group", type=int, default=8)
    g.add_argument("--prefix-len", type=int, default=512)
    g.add_argument("--suffix-len", type=int, default=64)
    g.add_argument("--turns", type=int, default=4)
    g.add_argument("--system-prompt-len", type=int, default=0)
    g.add_argument("--dataset-path", default=None)
    g.add_argument("--pool-size", type=int, default=256, help="prompts generated, then cycled")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-ignore-eos", action="store_true")
    g.add_argument("--think-time-ms", type=float, default=0.0, help="pause between tasks/turns")


class _Shared:
    """Built once per Locust process at startup: the tokenizer and the workload."""

    tokenizer = None
    sessions: list = []
    cycle = None
    model: str | None = None


@events.init.add_listener
def _build(environment, **_kw) -> None:
    # At startup, before any run timer: loading a tokenizer takes seconds.
    from locust.runners import MasterRunner

    o = environment.parsed_options
    if o is None or isinstance(environment.runner, MasterRunner):
        return  # a master sends no requests
    chat = is_chat_endpoint(o.endpoint)
    tokenizer = load_tokenizer(o.tokenizer)
    args = SimpleNamespace(
        workload=o.workload,
        seed=o.seed,
        num_prompts=o.pool_size,
        input_len=o.input_len,
        output_len=o.output_len,
        output_len_set=True,
        range_ratio=o.range_ratio,
        num_groups=o.num_groups,
        prompts_per_group=o.prompts_per_group,
        prefix_len=o.prefix_len,
        suffix_len=o.suffix_len,
        turns=o.turns,
        system_prompt_len=o.system_prompt_len,
        dataset_path=o.dataset_path,
        shuffle=False,
    )
    _Shared.tokenizer = tokenizer
    _Shared.sessions = build_workload(args, tokenizer, chat)
    _Shared.cycle = itertools.cycle(_Shared.sessions)
    _Shared.model = o.model
    # gevent's loop caches "now"; after seconds of blocking work, a timer started next
    # (Locust's --run-time) would fire at once. Refresh the cached time.
    import gevent

    gevent.get_hub().loop.update_now()


def _fire(environment, kind: str, name: str, ms: float) -> None:
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=0,
        exception=None,
        context={},
    )


class LLMUser(HttpUser):
    """Sends the workload's sessions in turn; a multi-turn session is one conversation."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.endpoint = o.endpoint
        self.chat = is_chat_endpoint(o.endpoint)
        self.ignore_eos = not o.no_ignore_eos and o.workload in ("random", "shared-prefix")
        self.think_s = o.think_time_ms / 1000.0
        self.headers = {"Content-Type": "application/json"}
        if o.api_key:
            self.headers["Authorization"] = f"Bearer {o.api_key}"
        if _Shared.model is None:
            r = self.client.get("/v1/models", headers=self.headers, name="/v1/models")
            _Shared.model = r.json()["data"][0]["id"]

    @task
    def session(self) -> None:
        s = next(_Shared.cycle)
        history: list[dict[str, str]] = []
        for k, turn in enumerate(s.turns):
            if k and self.think_s:
                time.sleep(self.think_s)
            if s.multi_turn:
                msgs = conversation_messages(history, turn)
                prompt = msgs if self.chat else render_chat(_Shared.tokenizer, msgs)
            else:
                prompt = turn.prompt
                if isinstance(prompt, list) and not self.chat:
                    prompt = render_chat(_Shared.tokenizer, prompt)
            text = self._stream(prompt, turn.output_len)
            if text is None:
                return
            if s.multi_turn:
                history = [*msgs, {"role": "assistant", "content": text}]
        if self.think_s:
            time.sleep(self.think_s)

    def _payload(self, prompt, max_tokens: int) -> bytes:
        body = {"model": _Shared.model, "stream": True, "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = (
                prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            )
            body["max_completion_tokens"] = max_tokens
        else:
            body["prompt"] = prompt
            body["max_tokens"] = max_tokens
        if self.ignore_eos:
            body["ignore_eos"] = True
        return json.dumps(body).encode()

    def _stream(self, prompt, max_tokens: int) -> str | None:
        """One streaming request; returns the generated text, or None if it failed."""
        perf = time.perf_counter
        st = perf()
        ttft = last = None
        texts: list[str] = []
        chunks = 0
        usage_tokens = None
        done = False
        with self.client.post(
            self.endpoint,
            data=self._payload(prompt, max_tokens),
            headers=self.headers,
            stream=True,
            catch_response=True,
            name=self.endpoint,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return None
            try:
                for line in resp.iter_lines(chunk_size=None):
                    if not line or not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    choices = obj.get("choices")
                    if choices:
                        c = choices[0]
                        text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
                        if text:
                            now = perf()
                            if ttft is None:
                                ttft = now - st
                            last = now
                            chunks += 1
                            texts.append(text)
                    if obj.get("usage"):
                        usage_tokens = obj["usage"].get("completion_tokens")
            except Exception as e:  # a broken stream is a failed request, not a crash
                resp.failure(f"stream error: {type(e).__name__}: {e}")
                return None
            if not done or ttft is None:
                resp.failure(
                    "stream ended before [DONE]" if not done else "no text in the response"
                )
                return None
            e2e = last - st
            n = usage_tokens if usage_tokens is not None else chunks
            resp.request_meta["response_time"] = e2e * 1000.0  # E2E, not time to headers
            resp.request_meta["response_length"] = n
            resp.success()
        _fire(self.environment, "TTFT", self.endpoint, ttft * 1000.0)
        if n > 1:
            _fire(self.environment, "TPOT", self.endpoint, (e2e - ttft) / (n - 1) * 1000.0)
        return "".join(texts)


def _parse_stages(spec: str) -> list[tuple[float, int, float]]:
    stages = []
    for part in spec.split(","):
        end, users, rate = part.split(":")
        stages.append((float(end), int(users), float(rate)))
    return stages


if os.environ.get("RAYFLEET_LOCUST_STAGES"):

    class StagesShape(LoadTestShape):
        """Ramp/soak stages from RAYFLEET_LOCUST_STAGES: "end_s:users:spawn_rate,..."."""

        stages = _parse_stages(os.environ["RAYFLEET_LOCUST_STAGES"])

        def tick(self):
            t = self.get_run_time()
            for end, users, rate in self.stages:
                if t < end:
                    return users, rate
            return None
