"""A trivial OpenAI-compatible streaming server with no model, for testing the client.

It streams `max_tokens` fixed tokens (one per SSE chunk) at a fixed pace, ends with a
usage chunk and `[DONE]`, and counts requests and tokens in Prometheus counters named
like the real server's (`rayfleet:request_success_total`, ...). With `--tokenizer` it
counts prompt tokens exactly (chat through the chat template); without, it counts words.
With `--record-timings` it keeps every chunk's send time (`time.perf_counter()`, the
system-wide monotonic clock on Linux) per `X-Request-Id`, served at `/fake/timings`, so
the client's receive times can be compared with the server's send times.

    python -m rayfleet.loadtests.fake_server --port 0 --itl-ms 10
prints `listening on http://127.0.0.1:PORT` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from aiohttp import web

TOKEN_TEXT = " hi"


class FakeServer:
    def __init__(
        self,
        default_tokens: int = 128,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        model: str = "fake-model",
        tokenizer: str | None = None,
        record_timings: bool = False,
        fail_every: int = 0,
    ):
        self.default_tokens = default_tokens
        self.ttft = ttft_ms / 1000.0
        self.itl = itl_ms / 1000.0
        self.model = model
        self.tok = None
        if tokenizer:
            from rayfleet.loadtests.workloads import load_tokenizer

            self.tok = load_tokenizer(tokenizer)
        self.record_timings = record_timings
        self.fail_every = fail_every
        self.timings: dict[str, list[float]] = {}
        self.counters = {"request_success": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self.num_requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/fake/timings", self.get_timings)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "root": self.model}]}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        lines = []
        for name, value in self.counters.items():
            lines.append(f"# TYPE rayfleet:{name}_total counter")
            lines.append(f'rayfleet:{name}_total{{model_name="{self.model}"}} {float(value)}')
        return web.Response(text="\n".join(lines) + "\n")

    async def get_timings(self, request: web.Request) -> web.Response:
        return web.json_response(self.timings)

    def count_prompt(self, body: dict) -> int:
        if "messages" in body:
            if self.tok is not None:
                from rayfleet.loadtests.workloads import chat_token_ids

                return len(chat_token_ids(self.tok, body["messages"]))
            return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):  # token ids
            return len(prompt)
        return len(self.tok.encode(prompt)) if self.tok is not None else len(prompt.split())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=True)

    async def _stream(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.num_requests += 1
        if self.fail_every and self.num_requests % self.fail_every == 0:
            return web.json_response(
                {"error": {"message": "injected failure", "type": "server_error", "code": 500}},
                status=500,
            )
        n = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_tokens
        n = int(n)
        prompt_tokens = self.count_prompt(body)
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        created = int(time.time())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:
            head = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
            }
            first = {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
            await resp.write(b"data: " + json.dumps(first).encode() + b"\n\n")
            tok = json.dumps(
                {
                    **head,
                    "choices": [
                        {"index": 0, "delta": {"content": TOKEN_TEXT}, "finish_reason": None}
                    ],
                }
            )
            last = json.dumps(
                {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            )
        else:
            head = {"id": rid, "object": "text_completion", "created": created, "model": self.model}
            tok = json.dumps(
                {**head, "choices": [{"index": 0, "text": TOKEN_TEXT, "finish_reason": None}]}
            )
            last = json.dumps(
                {**head, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            )
        tok_event = b"data: " + tok.encode() + b"\n\n"
        times: list[float] | None = [] if self.record_timings else None
        t0 = time.perf_counter()
        for k in range(n):
            due = t0 + self.ttft + k * self.itl
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif self.itl == 0 and k % 8 == 7:
                await asyncio.sleep(0)  # let other streams run
            await resp.write(tok_event)
            if times is not None:
                times.append(time.perf_counter())  # after the write: the bytes are with the OS
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        tail = json.dumps({**head, "choices": [], "usage": usage})
        await resp.write(
            b"data: " + last.encode() + b"\n\ndata: " + tail.encode() + b"\n\ndata: [DONE]\n\n"
        )
        await resp.write_eof()
        if times is not None:
            self.timings[rid] = times
        self.counters["request_success"] += 1
        self.counters["prompt_tokens"] += prompt_tokens
        self.counters["generation_tokens"] += n
        return resp


async def serve(server: FakeServer, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when asked for 0
    print(f"listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    p.add_argument(
        "--num-tokens", type=int, default=128, help="when the request sets no max_tokens"
    )
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0, help="0: as fast as it can")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--tokenizer", default=None, help="count prompt tokens with this tokenizer")
    p.add_argument("--record-timings", action="store_true")
    p.add_argument("--fail-every", type=int, default=0, help="answer every N-th request with 500")
    a = p.parse_args(argv)
    server = FakeServer(
        a.num_tokens, a.ttft_ms, a.itl_ms, a.model, a.tokenizer, a.record_timings, a.fail_every
    )
    try:
        asyncio.run(serve(server, a.host, a.port))
    except KeyboardInterrupt:
        pass


class FakeServerProcess:
    """Run the fake server in a child process (so its CPU time is not the client's).

    with FakeServerProcess(itl_ms=5) as url:
        ...
    """

    def __init__(self, *args: str, startup_timeout_s: float = 60.0, **options):
        self.argv = [*args]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                self.argv.append(flag)
            elif value not in (None, False):
                self.argv += [flag, str(value)]
        self.startup_timeout_s = startup_timeout_s
        self.proc = None
        self.url = ""

    def __enter__(self) -> str:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "rayfleet.loadtests.fake_server", "--port", "0", *self.argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                return self.url
            if not line and self.proc.poll() is not None:
                break
        self.__exit__(None, None, None)
        raise RuntimeError(f"fake server did not start: {' '.join(cmd)}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


if __name__ == "__main__":
    main()
