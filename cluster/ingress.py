"""Ingress: the OpenAI-compatible HTTP API (FastAPI under `serve.ingress`).

It checks the API key, bounds the body size, validates the request, applies the chat
template and tokenizes, then streams the request through a `DeploymentHandle` to an
`LLMServer` replica and writes OpenAI's JSON or Server-Sent Events. Every error is OpenAI's
error JSON: 400 bad parameters, 401 bad key, 404 unknown model, 413 body too large, 429 queue
full (Retry-After), 503 no replica ready. A client that goes away cancels the handle call,
which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
import rayfleet.engine as rf_engine
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from .config import RayfleetConfig, parse_config
from .kv_router import RouteHint
from .llm_server import GenerateRequest, StreamDelta
from .protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ProtocolError,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    chat_chunk,
    completion_chunk,
    error_body,
    usage_dict,
)
from .retry import ReplicaRetry, replica_gone
from .routing_policy import QueueFull
from .serve_env import handle_by_reference
from .token_channel import ChannelAddress, ChannelListener

logger = logging.getLogger("ray.serve")

STATUS_POLL_INTERVAL_S = 5.0  # plus a fresh look whenever the cached count is 0
_AUTH_FREE_PATHS = ("/health", "/version", "/docs", "/openapi.json", "/metrics")
_DONE = b"data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf
REPLICA_HEADER = "x-rayfleet-replica"  # which replica(s) took the request


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rayfleet")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Tokenizer (the ingress tokenizes; replicas receive token ids)


def load_tokenizer(cfg: RayfleetConfig):
    """The served model's tokenizer, from local files only."""
    path = cfg.model.tokenizer or cfg.engine.tokenizer or cfg.model.path or cfg.engine.model
    if path is None:
        path = rf_engine.default_model_path()
    loader = getattr(rf_engine, "load_tokenizer", None)
    if loader is not None:
        return loader(path)
    import os

    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path), local_files_only=True
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def apply_chat_template(tokenizer, messages: list[dict], **kw: Any) -> list[int]:
    helper = getattr(rf_engine, "apply_chat_template", None)
    if helper is not None:
        return list(helper(tokenizer, messages, **kw))
    if not getattr(tokenizer, "chat_template", None) and kw.get("chat_template") is None:
        raise ValueError("the served model has no chat template: use /v1/completions")
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# ASGI guard: API key and body size, before FastAPI parses anything


class _UsageTally:
    """Token counts of one streamed response, accumulated from its deltas."""

    def __init__(self) -> None:
        self.prompt_tokens = self.completion_tokens = self.cached = 0

    def add(self, d: StreamDelta) -> None:
        if d.num_prompt_tokens is not None:
            self.prompt_tokens += d.num_prompt_tokens
        self.cached = max(self.cached, d.num_cached_tokens)
        self.completion_tokens += sum(len(s.token_ids) for s in d.samples)

    def usage(self) -> dict[str, Any]:
        return usage_dict(self.prompt_tokens, self.completion_tokens, self.cached)


class _Guard:
    def __init__(self, app, ingress: Ingress):
        self.app = app
        self.ingress = ingress

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        ing = self.ingress
        headers = dict(scope.get("headers") or [])
        if ing.api_keys and not path.startswith(_AUTH_FREE_PATHS):
            if not ing.authorized(headers.get(b"authorization")):
                return await _send_json(
                    send,
                    401,
                    error_body(
                        "Invalid or missing API key: send `Authorization: Bearer <key>`",
                        "authentication_error",
                        None,
                        "invalid_api_key",
                    ),
                    {"www-authenticate": "Bearer"},
                )
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            limit = ing.max_body_bytes
            too_large = error_body(
                f"Request body is larger than the server's limit of {limit} bytes",
                "invalid_request_error",
                None,
                "request_too_large",
            )
            cl = headers.get(b"content-length")
            if cl is not None and cl.isdigit() and int(cl) > limit:
                return await _send_json(send, 413, too_large)
            chunks: list[bytes] = []
            size = 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # client went away
                body = msg.get("body", b"")
                size += len(body)
                if size > limit:
                    return await _send_json(send, 413, too_large)
                chunks.append(body)
                if not msg.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay_receive():
                if replay:
                    return replay.pop()
                return await receive()

            return await self.app(scope, replay_receive, send)
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None):
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    for k, v in (headers or {}).items():
        hdrs.append((k.encode(), v.encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


def _error_response(e: ProtocolError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------------------------
# The ingress deployment


class Ingress:
    """The HTTP front door (wrapped with `serve.ingress` and `serve.deployment` in app.py)."""

    async def __init__(self, llm_server, config: dict[str, Any], llm_deployment: str = "LLMServer"):
        self.cfg = parse_config(config)
        s = self.cfg.server
        self.model_name = self.cfg.served_model_name
        self.api_keys = [k.encode() for k in s.resolved_api_keys()]
        self.max_body_bytes = s.max_request_body_bytes
        self._llm = llm_server
        # Streams from the replicas over Serve's gRPC channel when the app set that up
        # (`serve_env`): no Ray task and object-store round trip per streamed item.
        self._stream = llm_server.options(stream=True, _by_reference=handle_by_reference())
        # Re-issues a request whose replica died before its first token (`retry.py`).
        self._retry = ReplicaRetry(s.max_replica_retries)
        self._llm_deployment = llm_deployment
        # rayfleet's request router reads each prompt's block hashes (Serve's own does not).
        self._route_block_size = (
            None if self.cfg.router.policy == "power-of-two" else self.cfg.engine.block_size
        )
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.cfg)
        await asyncio.to_thread(self._warm_chat_template)
        self._vocab_size = len(self.tokenizer)
        self._tok_strs: dict[int, str] = {}
        self.max_model_len: int | None = self.cfg.engine.max_model_len
        asc = self.cfg.replica.autoscaling_config
        self._scale_from_zero = asc is not None and asc.min_replicas == 0
        try:
            self._app_name = serve.get_replica_context().app_name
            self._in_serve = True
        except Exception:  # built outside a Serve replica (tests): nothing to poll
            self._app_name = self.cfg.app_name
            self._in_serve = False
        # The replicas send the deltas of streams this ingress starts here (`token_channel`).
        # Only in a Serve replica: built in-process (tests with fake replicas) there are no
        # remote replicas to connect, and the handle's own items carry the deltas.
        self._channel: ChannelListener | None = None
        if s.token_channel and self._in_serve:
            self._channel = await self._start_channel()
        self.ready_replicas: int | None = None
        await self._poll_replicas()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    def _warm_chat_template(self) -> None:
        """Render the chat template once: transformers compiles it on first use (~15 ms that
        the first chat request's TTFT would pay) and caches the result."""
        try:
            apply_chat_template(self.tokenizer, [{"role": "user", "content": "hi"}])
        except Exception:  # no template: chat requests get their error when they come
            pass

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def __del__(self):
        task = getattr(self, "_poll_task", None)
        if task is not None:
            task.cancel()
        if getattr(self, "_channel", None) is not None:
            await self._channel.close()

    async def _start_channel(self) -> ChannelListener | None:
        """Listen for the replicas' token-channel connections on this node's address (the
        one Ray uses, so a replica on another node reaches it as it reaches Ray)."""
        try:
            return await ChannelListener.start(ray.util.get_node_ip_address())
        except Exception:  # the handle's own stream still works: slower, never wrong
            logger.exception("rayfleet ingress: token channel not started; streaming via Serve")
            return None

    def _call(self, greq: GenerateRequest) -> Any:
        """Start `greq` on a replica: a stream of its deltas (re-called on a re-issue, so
        each try has its own channel stream)."""
        ch = self._channel
        if ch is None or asyncio.get_running_loop() is not ch.loop:
            greq.channel = None
            return self._stream.generate.remote(greq)

        def call(addr: ChannelAddress) -> Any:
            greq.channel = addr
            return self._stream.generate.remote(greq)

        return ch.open(call)

    # -- replica readiness --------------------------------------------------------------------

    def _count_ready(self) -> int | None:
        """RUNNING replicas of the LLM deployment, read from the controller's details dict.
        `serve.status()` builds pydantic models from that dict whose construction
        cloudpickles every deployment's request router class: ~50 ms of CPU per poll,
        holding the GIL (so stalling every stream of this replica) on a small machine."""
        try:
            from ray.serve.context import _get_global_client

            details = _get_global_client().get_serve_details()
            app = details["applications"].get(self._app_name)
            if app is None:
                return None
            dep = app["deployments"].get(self._llm_deployment)
            if dep is None:
                return None
            return sum(1 for r in dep["replicas"] if r["state"] == "RUNNING")
        except (ImportError, AttributeError, KeyError, TypeError):  # another Ray version
            pass
        st = serve.status()
        app = st.applications.get(self._app_name)
        if app is None:
            return None
        dep = app.deployments.get(self._llm_deployment)
        if dep is None:
            return None
        return int(dep.replica_states.get("RUNNING", 0))

    async def _poll_replicas(self) -> None:
        if not self._in_serve:  # serve.status() would start a Ray cluster
            return
        try:
            self.ready_replicas = await asyncio.to_thread(self._count_ready)
        except Exception:
            logger.warning("rayfleet ingress: serve.status() failed", exc_info=True)
            return
        if self.ready_replicas and self.max_model_len is None:
            try:
                info = await self._llm.model_info.remote()
                self.max_model_len = int(info["max_model_len"])
            except Exception:
                logger.warning("rayfleet ingress: model_info failed", exc_info=True)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_POLL_INTERVAL_S)
            await self._poll_replicas()

    async def check_ready(self) -> None:
        """Raise 503 when no replica is ready (re-checking once before giving up)."""
        if self.ready_replicas == 0 and not self._scale_from_zero:
            await self._poll_replicas()
            if self.ready_replicas == 0:
                raise ProtocolError(
                    f"No replica of model {self.model_name!r} is ready",
                    503,
                    code="no_replica_ready",
                    headers={"retry-after": str(max(1, self.cfg.server.retry_after_s))},
                )

    # -- request checks -----------------------------------------------------------------------

    def authorized(self, header: bytes | None) -> bool:
        if not self.api_keys:
            return True
        if not header or header[:7].lower() != b"bearer ":
            return False
        token = header[7:].strip()
        ok = False
        for key in self.api_keys:  # compare with every key: timing does not reveal which
            ok |= hmac.compare_digest(token, key)
        return ok

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ProtocolError(
                f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                404,
                param="model",
                code="model_not_found",
            )

    def check_n(self, n: int) -> None:
        if n > self.cfg.server.max_n:
            raise ProtocolError(
                f"n ({n}) exceeds the server's limit of {self.cfg.server.max_n}", param="n"
            )

    def tok_str(self, tid: int, lp: Any = None) -> str:
        s = getattr(lp, "decoded_token", None)
        if s is not None:
            return s
        s = self._tok_strs.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid])
            self._tok_strs[tid] = s
        return s

    # -- talking to replicas --------------------------------------------------------------------

    def route_hint(self, greq: GenerateRequest) -> RouteHint | None:
        """What the request router places by: the prompt's chained block hashes (computed
        exactly as the engine does), its length and priority."""
        bs = self._route_block_size
        if bs is None or not isinstance(greq.prompt, list):
            return None
        hashes = rf_engine.hash_prompt_blocks(greq.prompt, bs)
        return RouteHint(tuple(hashes), len(greq.prompt), greq.priority)

    async def start(self, greq: GenerateRequest) -> tuple[StreamDelta, Any]:
        """Send a request to a replica; return its first delta and the rest of the stream."""
        await self.check_ready()
        gen = None
        try:
            if greq.route is None:
                greq.route = self.route_hint(greq)
            first, gen = await self._retry.first_item(lambda: self._call(greq), greq.request_id)
        except QueueFull as e:
            raise ProtocolError(
                f"The server is at capacity ({e})",
                429,
                code="queue_full",
                headers={"retry-after": e.retry_after_header},
            ) from None
        except BackPressureError as e:
            retry = self.cfg.server.retry_after_s
            raise ProtocolError(
                f"The server is at capacity ({e}); retry after {retry} s",
                429,
                code="queue_full",
                headers={"retry-after": str(retry)},
            ) from None
        except (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError) as e:
            raise ProtocolError(f"No replica is available: {e}", 503) from None
        except StopAsyncIteration:
            raise ProtocolError("The replica returned no output", 500) from None
        except BaseException:
            if gen is not None:
                gen.cancel()
            raise
        if first.error is not None:
            raise ProtocolError(first.error, 400)
        return first, gen

    async def start_many(self, greqs: list[GenerateRequest]) -> list[tuple[StreamDelta, Any]]:
        started: list[tuple[StreamDelta, Any]] = []
        try:
            for g in greqs:  # one at a time: a 400 on any prompt starts nothing further
                started.append(await self.start(g))
        except BaseException:
            for _, gen in started:
                gen.cancel()
            raise
        return started

    @staticmethod
    async def iterate(started: list[tuple[StreamDelta, Any]]) -> AsyncIterator[tuple[int, Any]]:
        """Yield (prompt index, delta) from every stream until all are finished."""
        if len(started) == 1:
            first, gen = started[0]
            yield 0, first
            if first.finished:
                return
            async for d in gen:
                yield 0, d
                if d.finished:
                    return
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, first: StreamDelta, gen) -> None:
            try:
                queue.put_nowait((i, first))
                if not first.finished:
                    async for d in gen:
                        queue.put_nowait((i, d))
                        if d.finished:
                            break
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, f, g)) for i, (f, g) in enumerate(started)]
        remaining = len(tasks)
        try:
            while remaining:
                i, d = await queue.get()
                if d is None:
                    remaining -= 1
                elif isinstance(d, Exception):
                    raise d
                else:
                    yield i, d
        finally:
            for t in tasks:
                t.cancel()
            for _, gen in started:
                gen.cancel()

    async def collect(
        self, greqs: list[GenerateRequest], started: list[tuple[StreamDelta, Any]]
    ) -> list[tuple[int, StreamDelta]]:
        """Every (prompt index, delta) of a non-streaming request. Its client sees nothing
        before the whole answer, so when a replica dies mid-way the whole request is sent
        again (`server.max_replica_retries` times at most) rather than failing. A failure
        that is not a dead replica, or one past the bound, is a clean 5xx."""
        attempt = 0
        while True:
            items: list[tuple[int, StreamDelta]] = []
            try:
                async for item in self.iterate(started):
                    items.append(item)
                return items
            except Exception as e:
                for _, gen in started:
                    gen.cancel()  # the other prompts' streams, on live replicas
                if not self._retry.may_reissue(e, attempt, greqs[0].request_id, "during"):
                    if replica_gone(e):
                        raise ProtocolError(
                            f"The replica serving this request died after {attempt + 1} "
                            f"tries ({type(e).__name__})",
                            503,
                        ) from None
                    raise
                attempt += 1
                # In place: the caller's list (and the replica header) follows the re-issue.
                started[:] = await self.start_many(greqs)

    # -- endpoints ------------------------------------------------------------------------------

    def _greq(self, rid: str, prompt: list[int], params, priority: int, endpoint: str, text):
        log_text = text if self.cfg.server.log_prompts else None
        return GenerateRequest(rid, prompt, params, priority, endpoint, log_text)

    async def chat(self, req: ChatCompletionRequest) -> Any:
        self.check_model(req.model)
        params = req.to_sampling_params()
        self.check_n(params.n)
        messages = [m.as_template_dict() for m in req.messages]
        kw = dict(req.chat_template_kwargs or {})
        kw["add_generation_prompt"] = req.add_generation_prompt
        if req.continue_final_message:
            kw["continue_final_message"] = True
        try:
            ids = apply_chat_template(self.tokenizer, messages, **kw)
        except ProtocolError:
            raise
        except Exception as e:
            raise ProtocolError(
                f"Applying the chat template failed: {e}", param="messages"
            ) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        text = json.dumps(messages) if self.cfg.server.log_prompts else None
        greqs = [self._greq(rid, ids, params, req.priority, "chat", text)]
        started = await self.start_many(greqs)
        created = int(time.time())
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse_response(
                self._chat_stream(rid, created, params.n, top, include_usage, started), started
            )
        body = await self._chat_full(rid, created, params.n, top, greqs, started)
        return self._json_response(body, started)

    async def completions(self, req: CompletionRequest) -> Any:
        self.check_model(req.model)
        params = req.to_sampling_params()
        self.check_n(params.n)
        prompts = req.prompts()
        if len(prompts) * params.n > self.cfg.server.max_n * 8:
            raise ProtocolError(
                f"too many choices: {len(prompts)} prompts x n={params.n}", param="prompt"
            )
        rid = f"cmpl-{uuid.uuid4().hex}"
        greqs, texts = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
                if not ids:
                    raise ProtocolError("prompt must not be empty", param="prompt")
                text = p
            else:
                self._check_token_ids(p, "prompt")
                ids = p
                text = self.tokenizer.decode(p) if req.echo or self.cfg.server.log_prompts else ""
            texts.append(text)
            prid = rid if len(prompts) == 1 else f"{rid}-{i}"
            greqs.append(self._greq(prid, ids, params, req.priority, "completions", text))
        started = await self.start_many(greqs)
        created = int(time.time())
        echo = texts if req.echo else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse_response(
                self._completion_stream(
                    rid,
                    created,
                    params.n,
                    req.logprobs,
                    echo,
                    include_usage,
                    started,
                    [g.prompt for g in greqs],
                ),
                started,
            )
        body = await self._completion_full(
            rid, created, params.n, req.logprobs, echo, greqs, started
        )
        return self._json_response(body, started)

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self._vocab_size]
        if bad:
            raise ProtocolError(
                f"token ids out of range [0, {self._vocab_size}): {bad[:8]}", param=param
            )

    @staticmethod
    def _replica_header(started: list[tuple[StreamDelta, Any]]) -> dict[str, str]:
        """`x-rayfleet-replica`: the replica(s) that took the request (comma-separated, one
        per prompt of a batch; after a re-issue, the new one), for tracing a latency to a
        replica."""
        ids = [first.replica for first, _ in started if first.replica]
        return {REPLICA_HEADER: ",".join(dict.fromkeys(ids))} if ids else {}

    def _sse_response(
        self, body: AsyncIterator[bytes], started: list[tuple[StreamDelta, Any]]
    ) -> StreamingResponse:
        # No x-request-id here: Serve's proxy sets that header to its own request id (the
        # client's, when it sent one) on every response; a second one would make two. The
        # completion's own id is in every chunk's `id`.
        headers = {"cache-control": "no-cache"} | self._replica_header(started)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    def _json_response(
        self, body: dict[str, Any], started: list[tuple[StreamDelta, Any]]
    ) -> JSONResponse:
        return JSONResponse(body, headers=self._replica_header(started))

    # -- chat output --------------------------------------------------------------------------

    def _chat_logprobs(self, token_ids: list[int], lps, top: int) -> list[dict[str, Any]]:
        out = []
        for tid, d in zip(token_ids, lps or [], strict=False):
            lp = d.get(tid)
            tok = self.tok_str(tid, lp)
            tops = sorted(
                ((t, x) for t, x in d.items() if x.rank is not None and x.rank <= top),
                key=lambda tx: tx[1].rank,
            )[:top]
            out.append(
                {
                    "token": tok,
                    "logprob": max(lp.logprob, _MIN_LOGPROB) if lp is not None else _MIN_LOGPROB,
                    "bytes": list(tok.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": (s := self.tok_str(t, x)),
                            "logprob": max(x.logprob, _MIN_LOGPROB),
                            "bytes": list(s.encode("utf-8")),
                        }
                        for t, x in tops
                    ],
                }
            )
        return out

    async def _chat_full(self, rid, created, n, top, greqs, started) -> dict[str, Any]:
        texts = [""] * n
        counts = [0] * n
        lps: list[list] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        stops: list[Any] = [None] * n
        prompt_tokens = cached = 0
        for _, d in await self.collect(greqs, started):
            if d.num_prompt_tokens is not None:
                prompt_tokens += d.num_prompt_tokens
            cached = max(cached, d.num_cached_tokens)
            for s in d.samples:
                texts[s.index] += s.text
                counts[s.index] += len(s.token_ids)
                if top is not None:
                    lps[s.index] += self._chat_logprobs(s.token_ids, s.logprobs, top)
                if s.finish_reason is not None:
                    reasons[s.index], stops[s.index] = s.finish_reason, s.stop_reason
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=texts[i]),
                logprobs=ChoiceLogprobs(content=lps[i]) if top is not None else None,
                finish_reason=reasons[i],
                stop_reason=stops[i],
            )
            for i in range(n)
        ]
        resp = ChatCompletionResponse(
            id=rid,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=Usage(**usage_dict(prompt_tokens, sum(counts), cached)),
        )
        return resp.model_dump(exclude_none=False)

    def _chat_stream(self, rid, created, n, top, include_usage, started):
        tally = _UsageTally()
        body = self._chat_chunks(rid, created, n, top, include_usage, tally, started)
        return self._framed_stream(rid, created, chat_chunk, include_usage, tally, body, started)

    async def _chat_chunks(self, rid, created, n, top, include_usage, tally, started):
        model = self.model_name
        extra = {"usage": None} if include_usage else {}
        for i in range(n):
            yield _sse(
                chat_chunk(
                    rid,
                    created,
                    model,
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                )
                | extra
            )
        async for _, d in self.iterate(started):
            tally.add(d)
            for s in d.samples:
                if not s.text and s.finish_reason is None and top is None:
                    continue
                choice: dict[str, Any] = {
                    "index": s.index,
                    "delta": {"content": s.text} if s.text else {},
                    "logprobs": (
                        {"content": self._chat_logprobs(s.token_ids, s.logprobs, top)}
                        if top is not None and s.token_ids
                        else None
                    ),
                    "finish_reason": s.finish_reason,
                }
                if s.stop_reason is not None:
                    choice["stop_reason"] = s.stop_reason
                yield _sse(chat_chunk(rid, created, model, [choice]) | extra)

    async def _framed_stream(self, rid, created, make_chunk, include_usage, tally, body, started):
        """Frame a stream's chunks the same way for chat and completions: the final usage
        chunk, `[DONE]`, an error event if the body fails, and cancelling replica streams."""
        try:
            async for item in body:
                yield item
            if include_usage:
                yield _sse(make_chunk(rid, created, self.model_name, [], tally.usage()))
            yield _DONE
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            logger.exception("rayfleet ingress: stream %s failed", rid)
            yield _sse(error_body(f"stream failed: {e}", "server_error"))
            yield _DONE
        finally:
            await body.aclose()
            for _, gen in started:
                gen.cancel()  # a no-op when the stream already finished

    # -- completions output ---------------------------------------------------------------------

    def _completion_logprobs(
        self, token_ids: list[int], lps, top: int, offset: int
    ) -> tuple[dict[str, Any], int]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, d in zip(token_ids, lps or [], strict=False):
            lp = d.get(tid)
            tok = self.tok_str(tid, lp)
            tokens.append(tok)
            token_lps.append(max(lp.logprob, _MIN_LOGPROB) if lp is not None else _MIN_LOGPROB)
            ranked = sorted(
                ((t, x) for t, x in d.items() if x.rank is not None and x.rank <= top),
                key=lambda tx: tx[1].rank,
            )[:top]
            tops.append({self.tok_str(t, x): max(x.logprob, _MIN_LOGPROB) for t, x in ranked})
            offsets.append(offset)
            offset += len(tok)
        return (
            {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens,
             "top_logprobs": tops},
            offset,
        )  # fmt: skip

    def _echo_logprobs(self, ids: list[int], plps: list, top: int) -> dict[str, list]:
        """The prompt's part of an echoed choice's logprobs: its tokens from offset 0, the
        first with null logprobs (nothing predicts it), as OpenAI's legacy API gives them."""
        first = self.tok_str(ids[0])
        part, _ = self._completion_logprobs(ids[1:], plps[1:], top, len(first))
        return {
            "text_offset": [0] + part["text_offset"],
            "token_logprobs": [None] + part["token_logprobs"],
            "tokens": [first] + part["tokens"],
            "top_logprobs": [None] + part["top_logprobs"],
        }

    async def _completion_full(self, rid, created, n, top, echo, greqs, started) -> dict:
        num = len(started) * n
        texts = [""] * num
        counts = [0] * num
        lps: list[dict[str, list]] = [
            {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
            for _ in range(num)
        ]
        offsets = [0] * num
        reasons: list[str | None] = [None] * num
        stops: list[Any] = [None] * num
        if echo is not None:
            for p in range(len(started)):
                for i in range(n):
                    texts[p * n + i] = echo[p]
                    offsets[p * n + i] = len(echo[p])
        prompt_tokens = cached = 0
        echoed_lps: dict[int, dict[str, list]] = {}  # prompt -> its tokens' logprobs
        for p, d in await self.collect(greqs, started):
            if d.prompt_logprobs is not None and top is not None:
                echoed_lps[p] = self._echo_logprobs(greqs[p].prompt, d.prompt_logprobs, top)
            if d.num_prompt_tokens is not None:
                prompt_tokens += d.num_prompt_tokens
            cached = max(cached, d.num_cached_tokens)
            for s in d.samples:
                c = p * n + s.index
                texts[c] += s.text
                counts[c] += len(s.token_ids)
                if top is not None:
                    part, offsets[c] = self._completion_logprobs(
                        s.token_ids, s.logprobs, top, offsets[c]
                    )
                    for k, v in part.items():
                        lps[c][k] += v
                if s.finish_reason is not None:
                    reasons[c], stops[c] = s.finish_reason, s.stop_reason
        for p, part in echoed_lps.items():
            for c in range(p * n, p * n + n):
                lps[c] = {k: part[k] + lps[c][k] for k in part}
        choices = [
            CompletionChoice(
                index=c,
                text=texts[c],
                logprobs=CompletionLogprobs(**lps[c]) if top is not None else None,
                finish_reason=reasons[c],
                stop_reason=stops[c],
            )
            for c in range(num)
        ]
        resp = CompletionResponse(
            id=rid,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=Usage(**usage_dict(prompt_tokens, sum(counts), cached)),
        )
        return resp.model_dump(exclude_none=False)

    def _completion_stream(self, rid, created, n, top, echo, include_usage, started, prompts):
        tally = _UsageTally()
        body = self._completion_chunks(
            rid, created, n, top, echo, include_usage, tally, started, prompts
        )
        return self._framed_stream(
            rid, created, completion_chunk, include_usage, tally, body, started
        )

    async def _completion_chunks(
        self, rid, created, n, top, echo, include_usage, tally, started, prompts
    ):
        model = self.model_name
        extra = {"usage": None} if include_usage else {}
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        echoed_lps: dict[int, dict[str, list]] = {}  # prompt -> its tokens' logprobs
        async for p, d in self.iterate(started):
            tally.add(d)
            # Sample 0's first item carries them; the engine holds other samples back
            # until then, so every choice's first chunk can start with them.
            if d.prompt_logprobs is not None and top is not None and echo is not None:
                echoed_lps[p] = self._echo_logprobs(prompts[p], d.prompt_logprobs, top)
            for s in d.samples:
                c = p * n + s.index
                text = s.text
                first_chunk = echo is not None and c not in echoed
                if first_chunk:
                    echoed.add(c)
                    text = echo[p] + text
                    offsets[c] = len(echo[p])
                if not text and s.finish_reason is None and top is None:
                    continue
                logprobs = None
                if top is not None and s.token_ids:
                    logprobs, offsets[c] = self._completion_logprobs(
                        s.token_ids, s.logprobs, top, offsets.get(c, 0)
                    )
                if first_chunk and p in echoed_lps:
                    part = echoed_lps[p]
                    logprobs = {k: part[k] + (logprobs or {}).get(k, []) for k in part}
                choice: dict[str, Any] = {
                    "index": c,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": s.finish_reason,
                }
                if s.stop_reason is not None:
                    choice["stop_reason"] = s.stop_reason
                yield _sse(completion_chunk(rid, created, model, [choice]) | extra)

    # -- small endpoints ----------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        path = self.cfg.model.path or self.cfg.engine.model
        card = ModelCard(id=self.model_name, root=path, max_model_len=self.max_model_len)
        return ModelList(data=[card]).model_dump()

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        req.check()
        if req.messages is not None:
            try:
                ids = apply_chat_template(
                    self.tokenizer,
                    [m.as_template_dict() for m in req.messages],
                    add_generation_prompt=req.add_generation_prompt,
                )
            except Exception as e:
                raise ProtocolError(
                    f"Applying the chat template failed: {e}", param="messages"
                ) from None
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        resp = TokenizeResponse(
            count=len(ids),
            max_model_len=self.max_model_len,
            tokens=ids,
            token_strs=self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None,
        )
        return resp.model_dump(exclude_none=True)

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)).model_dump()

    async def health(self) -> JSONResponse:
        if self.ready_replicas == 0:  # the cached count may be stale: look again
            await self._poll_replicas()
        n = self.ready_replicas
        if n == 0:
            return _error_response(
                ProtocolError(f"No replica of model {self.model_name!r} is ready", 503)
            )
        return JSONResponse({"status": "ok", "model": self.model_name, "ready_replicas": n})

    async def router_debug(self) -> dict[str, Any]:
        """Debug and test hook, not on HTTP: call it through a handle to this deployment,
        `serve.get_deployment_handle("Ingress", app).router_debug.remote().result()`. This
        ingress replica's request-router view (`KVAwareRequestRouter.debug_state`: per
        LLMServer replica its indexed prefix blocks and load, replicas seen dead; None under
        power-of-two), how many requests it re-issued after their replica died, and its
        token channel's counts (None when it is off)."""
        from .kv_router import router_debug_of

        ch = self._channel
        return {
            "router": await router_debug_of(self._stream),
            "replica_retries": self._retry.retries,
            "token_channel": None
            if ch is None
            else {
                "streams_opened": ch.streams_opened,
                "open_streams": ch.open_streams,
                "rejected_connections": ch.rejected_connections,
            },
        }


def build_api(ing: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica (routes close over the replica's state)."""
    app = FastAPI(title="rayfleet", version=_version(), docs_url="/docs", redoc_url=None)
    app.add_middleware(_Guard, ingress=ing)

    @app.exception_handler(ProtocolError)
    async def _protocol_error(_: Request, e: ProtocolError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(
            f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
            for er in errs
        )
        param = loc[0] if loc else None
        return _error_response(ProtocolError(f"Invalid request: {msg}", 400, param=param))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        logger.exception("rayfleet ingress: unhandled error")
        return _error_response(ProtocolError(f"Internal server error: {type(e).__name__}", 500))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await ing.chat(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await ing.completions(body)

    @app.get("/v1/models")
    async def models():
        return ing.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        ing.check_model(model_id)
        return ing.models()["data"][0]

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return ing.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return ing.detokenize(body)

    @app.get("/health")
    async def health():
        return await ing.health()

    @app.get("/version")
    async def version():
        return {"version": _version()}

    return app


__all__ = ["Ingress", "build_api", "load_tokenizer", "apply_chat_template"]
