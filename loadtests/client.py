"""Asynchronous streaming client for OpenAI-compatible `/v1/completions` and
`/v1/chat/completions`, timing each request the way `vllm bench serve` does.

Per token it does as little as possible: one `perf_counter()` per network read (every
event in a read arrived at the same moment), one `json.loads` per event, and list appends.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from rayfleet.loadtests.metrics import RequestOutcome

_DONE = b"[DONE]"


def is_chat_endpoint(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def _http_error_message(status: int, body: str) -> str:
    try:
        err = json.loads(body)
        msg = err.get("error", err)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except (ValueError, AttributeError):
        msg = body
    return f"HTTP {status}: {str(msg)[:300]}"


# Which replica rayfleet placed a request on (other servers do not send it).
REPLICA_HEADER = "x-rayfleet-replica"


class StreamingClient:
    """One HTTP session (keep-alive connection pool) shared by all requests of a run."""

    def __init__(
        self,
        base_url: str,
        endpoint: str = "/v1/completions",
        model: str | None = None,
        api_key: str | None = None,
        ignore_eos: bool = False,
        extra_body: dict[str, Any] | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 0,
    ):
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint if endpoint.startswith("/") else "/" + endpoint
        self.url = self.base_url + self.endpoint
        self.chat = is_chat_endpoint(endpoint)
        self.model = model
        self.ignore_eos = ignore_eos
        self.extra_body = dict(extra_body or {})
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s)
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamingClient:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=self.max_connections, keepalive_timeout=60
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, auto_decompress=False
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("StreamingClient is not open: use `async with StreamingClient(...)`")
        return self.session

    # ------------------------------------------------------------ plain GETs

    async def get_text(self, path: str) -> tuple[int, str]:
        """GET a path of the server, or an absolute URL."""
        session = self._session()
        url = path if "://" in path else self.base_url + path
        # The session does not decompress (streams are read raw, for speed): ask for plain
        # bytes, or a server that compresses (Ray's metrics agent gzips) sends undecodable text.
        headers = {**self.headers, "Accept-Encoding": "identity"}
        async with session.get(url, headers=headers) as r:
            return r.status, await r.text()

    async def first_model(self) -> str:
        status, body = await self.get_text("/v1/models")
        if status != 200:
            raise RuntimeError(
                f"GET {self.base_url}/v1/models: {_http_error_message(status, body)}"
            )
        data = json.loads(body).get("data") or []
        if not data:
            raise RuntimeError(f"{self.base_url}/v1/models lists no models")
        return data[0]["id"]

    # ------------------------------------------------------------ one request

    def payload(self, prompt: str | list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            body["messages"] = prompt
            body["max_completion_tokens"] = max_tokens
        else:
            if not isinstance(prompt, str):
                raise ValueError("chat messages need a chat endpoint (or render them first)")
            body["prompt"] = prompt
            body["max_tokens"] = max_tokens
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    async def request(
        self,
        prompt: str | list[dict[str, str]],
        max_tokens: int,
        request_id: str | None = None,
        prompt_len: int | None = None,
    ) -> RequestOutcome:
        """Send one streaming request and time it. Never raises for a failed request."""
        session = self._session()
        out = RequestOutcome(
            request_id=request_id or "", prompt_len=prompt_len, expected_output_len=max_tokens
        )
        data = json.dumps(self.payload(prompt, max_tokens)).encode()
        headers = (
            self.headers if request_id is None else {**self.headers, "X-Request-Id": request_id}
        )
        chat = self.chat
        itl = out.itl
        texts: list[str] = []
        chunks = 0
        done = False
        last_token = last_choice = 0.0
        loads = json.loads
        perf = time.perf_counter
        st = perf()
        out.start_time = st
        try:
            async with session.post(self.url, data=data, headers=headers) as resp:
                out.replica = resp.headers.get(REPLICA_HEADER)
                if resp.status != 200:
                    out.error = _http_error_message(resp.status, await resp.text())
                    out.error_reason = f"HTTP {resp.status}"
                    return out
                buf = b""
                async for piece in resp.content.iter_any():
                    now = perf()
                    buf = buf + piece if buf else piece
                    if b"\r" in buf:
                        buf = buf.replace(b"\r\n", b"\n")
                    while True:
                        end = buf.find(b"\n\n")
                        if end < 0:
                            break
                        event = buf[:end]
                        buf = buf[end + 2 :]
                        if not event.startswith(b"data:"):
                            if event.startswith(b":") or not event:
                                continue  # SSE comment / keep-alive
                            # several lines in one event: keep the data lines
                            event = b"".join(
                                ln[5:] for ln in event.split(b"\n") if ln.startswith(b"data:")
                            )
                            if not event:
                                continue
                        else:
                            event = event[5:]
                        event = event.strip()
                        if event == _DONE:
                            done = True
                            continue
                        obj = loads(event)
                        choices = obj.get("choices")
                        if choices:
                            c = choices[0]
                            if chat:
                                delta = c.get("delta") or {}
                                text = delta.get("content") or delta.get("reasoning_content")
                            else:
                                text = c.get("text")
                            if text:
                                if chunks == 0:
                                    out.ttft = now - st
                                else:
                                    itl.append(now - last_token)
                                last_token = now
                                chunks += 1
                                texts.append(text)
                            if c.get("finish_reason"):
                                out.finish_reason = c["finish_reason"]
                            last_choice = now
                        usage = obj.get("usage")
                        if usage:
                            out.output_tokens = usage.get("completion_tokens")
                            out.prompt_tokens = usage.get("prompt_tokens")
                        if "error" in obj and not choices:
                            err = obj["error"]
                            msg = err.get("message", err) if isinstance(err, dict) else err
                            out.error = f"stream error: {str(msg)[:300]}"
                            out.error_reason = "stream error"
        except TimeoutError:
            out.error, out.error_reason = "timeout (no data for too long)", "timeout"
        except aiohttp.ClientError as e:
            out.error, out.error_reason = f"{type(e).__name__}: {e}", type(e).__name__
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            out.error, out.error_reason = f"bad stream: {type(e).__name__}: {e}", "bad stream"
        out.chunks = chunks
        out.generated_text = "".join(texts)
        out.latency = (last_choice or perf()) - st
        if out.error:
            return out
        if chunks == 0:
            out.error, out.error_reason = "no text in the response", "empty response"
        elif not done and out.finish_reason is None:
            out.error, out.error_reason = "stream ended before [DONE]", "incomplete stream"
        else:
            out.success = True
        return out
