"""The streaming client's reading of Server-Sent Events, against scripted in-process
servers on 127.0.0.1: split and merged events, CRLF, comments, errors, cut-off streams."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from rayfleet.loadtests.client import StreamingClient


def _chunk(text: str | None, finish: str | None = None, chat: bool = False) -> bytes:
    if chat:
        choice = {
            "index": 0,
            "delta": {} if text is None else {"content": text},
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}\n\n'
DONE = b"data: [DONE]\n\n"


def _run(pieces: list[bytes], endpoint: str = "/v1/completions", status: int = 200):
    """Serve `pieces` (each written separately, with a short pause) and send one request."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        if status != 200:
            return web.json_response({"error": {"message": "nope"}}, status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for p in pieces:
            await resp.write(p)
            await asyncio.sleep(0.002)
        return resp

    async def main():
        app = web.Application()
        app.router.add_post(endpoint, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with StreamingClient(f"http://127.0.0.1:{port}", endpoint, "m") as c:
                return await c.request("hi", 3, "rid-1", prompt_len=3)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_one_token_per_event_gives_ttft_and_gaps():
    out = _run([_chunk("a"), _chunk("b"), _chunk("c"), _chunk(None, "length"), USAGE, DONE])
    assert out.success and out.generated_text == "abc"
    assert out.chunks == 3 and len(out.itl) == 2
    assert out.output_tokens == 3 and out.prompt_tokens == 3 and out.finish_reason == "length"
    assert 0 < out.ttft <= out.latency
    assert out.request_id == "rid-1"


def test_events_split_across_writes_and_merged_in_one_write():
    blob = _chunk("a") + _chunk("b") + _chunk("c")
    pieces = [blob[:7], blob[7:40], blob[40:], USAGE + DONE]
    out = _run(pieces)
    assert out.success and out.generated_text == "abc" and out.chunks == 3


def test_crlf_comments_and_event_fields_are_understood():
    crlf = _chunk("a").replace(b"\n", b"\r\n")
    named = b"event: message\n" + _chunk("b")
    out = _run([b": keep-alive\n\n", crlf, named, USAGE, DONE])
    assert out.success and out.generated_text == "ab"


def test_chat_deltas_skip_the_role_chunk_for_ttft():
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
    pieces = [role, _chunk("x", chat=True), _chunk("y", chat=True), USAGE, DONE]
    out = _run(pieces, endpoint="/v1/chat/completions")
    assert out.success and out.generated_text == "xy" and out.chunks == 2 and len(out.itl) == 1


def test_http_errors_carry_the_status_and_message():
    out = _run([], status=429)
    assert not out.success and out.error_reason == "HTTP 429" and "nope" in out.error


def test_a_stream_cut_before_done_is_a_failure():
    out = _run([_chunk("a"), _chunk("b")])
    assert not out.success and out.error_reason == "incomplete stream"


def test_an_error_event_in_the_stream_is_a_failure():
    err = b'data: {"error": {"message": "engine died", "code": 500}}\n\n'
    out = _run([_chunk("a"), err, DONE])
    assert not out.success and out.error_reason == "stream error" and "engine died" in out.error


def test_garbage_in_the_stream_is_a_failure_not_a_crash():
    out = _run([_chunk("a"), b"data: {not json\n\n", DONE])
    assert not out.success and out.error_reason == "bad stream"


def test_no_text_at_all_is_a_failure():
    out = _run([_chunk(None, "stop"), USAGE, DONE])
    assert not out.success and out.error_reason == "empty response"


def test_get_text_asks_for_plain_text_from_a_compressing_server():
    """Ray's metrics agent gzips /metrics for clients that accept gzip; the client's session
    does not decompress, so it must not offer gzip."""
    import gzip

    async def handler(request: web.Request) -> web.Response:
        body = b"rayfleet:request_success_total 3\n"
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip"})
        return web.Response(body=body, content_type="text/plain")

    async def main():
        app = web.Application()
        app.router.add_get("/metrics", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with StreamingClient(f"http://127.0.0.1:{port}", "/v1/completions", "m") as c:
                return await c.get_text("/metrics")
        finally:
            await runner.cleanup()

    status, text = asyncio.run(main())
    assert status == 200 and text == "rayfleet:request_success_total 3\n"
