"""The token channel (`rayfleet.cluster.token_channel`) on real loopback sockets, no Ray.

The replica's side is a `ChannelSender`; the handle call is an asyncio task wrapped the way
Serve's streaming response behaves (async iterator ending when the call returns, `cancel()`).
The same path through real Serve replicas runs in tests/test_serve_openai.py and
tests/test_kv_router_live.py, where the channel is on by default.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from rayfleet.cluster import token_channel
from rayfleet.cluster.llm_server import SampleDelta, StreamDelta
from rayfleet.cluster.token_channel import (
    SECRET_BYTES,
    ChannelError,
    ChannelListener,
    ChannelSender,
)


class Call:
    """A handle call running `body(addr)` as the replica would: yields nothing, ends when
    the body returns, raises what it raises; `cancel()` cancels it."""

    def __init__(self, body, addr):
        self.task = asyncio.get_running_loop().create_task(body(addr))

    def __aiter__(self):
        return self

    async def __anext__(self):
        await self.task
        raise StopAsyncIteration

    def cancel(self):
        self.task.cancel()


def delta(i: int, finished: bool = False) -> StreamDelta:
    return StreamDelta(
        samples=[SampleDelta(0, f"t{i}", [i], finish_reason="length" if finished else None)],
        finished=finished,
    )


async def drain(stream) -> list[StreamDelta]:
    return [d async for d in stream]


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def channel():
    """A listener on loopback and a replica's sender, both closed afterwards."""
    lis = await ChannelListener.start("127.0.0.1")
    sender = ChannelSender()
    try:
        yield lis, sender
    finally:
        await sender.close()
        await lis.close()


def test_deltas_arrive_in_order_and_the_stream_is_forgotten_when_finished():
    async def main():
        async with channel() as (lis, sender):

            async def replica(addr):
                for i in range(50):
                    await sender.send(addr, delta(i, finished=i == 49))

            got = await drain(lis.open(lambda a: Call(replica, a)))
            assert [d.samples[0].token_ids[0] for d in got] == list(range(50))
            assert got[-1].finished and got[-1].samples[0].finish_reason == "length"
            assert lis.open_streams == 0

    run(main())


def test_concurrent_streams_share_one_connection_without_mixing():
    async def main():
        async with channel() as (lis, sender):

            def replica_for(base: int):
                async def replica(addr):
                    for i in range(30):
                        await sender.send(addr, delta(base + i, finished=i == 29))
                        await asyncio.sleep(0)

                return replica

            streams = [lis.open(lambda a, b=b: Call(replica_for(b), a)) for b in (0, 1000, 2000)]
            outs = await asyncio.gather(*(drain(s) for s in streams))
            for b, got in zip((0, 1000, 2000), outs, strict=True):
                assert [d.samples[0].token_ids[0] for d in got] == [b + i for i in range(30)]
            assert len(sender._conns) == 1  # one connection per listener, opened once

    run(main())


def test_frames_still_in_flight_when_the_call_returns_are_read():
    """The call's return and its frames travel on different connections: the stream waits
    for the finished delta after the call ended."""

    async def main():
        async with channel() as (lis, sender):
            late: list[asyncio.Task] = []

            async def replica(addr):
                async def later():
                    await asyncio.sleep(0.2)
                    await sender.send(addr, delta(0))
                    await sender.send(addr, delta(1, finished=True))

                late.append(asyncio.create_task(later()))  # the call returns first

            got = await drain(lis.open(lambda a: Call(replica, a)))
            assert [d.samples[0].token_ids[0] for d in got] == [0, 1]

    run(main())


def test_a_failing_call_fails_the_stream_with_its_error():
    class ActorDied(Exception):
        pass

    async def main():
        async with channel() as (lis, sender):

            async def replica(addr):
                await sender.send(addr, delta(0))
                await asyncio.sleep(0.05)
                raise ActorDied("replica gone")

            stream = lis.open(lambda a: Call(replica, a))
            first = await stream.__anext__()
            assert first.samples[0].token_ids == [0]
            with pytest.raises(ActorDied, match="replica gone"):
                await stream.__anext__()
            assert lis.open_streams == 0

    run(main())


def test_a_call_that_ends_without_its_finished_delta_is_a_clean_channel_error(monkeypatch):
    monkeypatch.setattr(token_channel, "FRAMES_AFTER_RETURN_TIMEOUT_S", 0.2)

    async def main():
        async with channel() as (lis, sender):

            async def replica(addr):
                await sender.send(addr, delta(0))  # never a finished one

            stream = lis.open(lambda a: Call(replica, a))
            assert (await stream.__anext__()).samples[0].token_ids == [0]
            with pytest.raises(ChannelError, match="never arrived"):
                await stream.__anext__()
            assert lis.open_streams == 0

    run(main())


def test_cancel_cancels_the_call_and_drops_its_later_frames():
    async def main():
        async with channel() as (lis, sender):
            cancelled = asyncio.Event()

            async def replica(addr):
                try:
                    for i in range(1000):
                        await sender.send(addr, delta(i))
                        await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    cancelled.set()  # the replica aborts the engine request here
                    raise

            stream = lis.open(lambda a: Call(replica, a))
            await stream.__anext__()
            stream.cancel()
            await asyncio.wait_for(cancelled.wait(), 5)
            assert lis.open_streams == 0
            # The next request on the same connection still gets only its own frames.

            async def other(addr):
                await sender.send(addr, delta(7, finished=True))

            got = await drain(lis.open(lambda a: Call(other, a)))
            assert [d.samples[0].token_ids for d in got] == [[7]]

    run(main())


def test_a_connection_without_the_secret_is_dropped_before_any_frame_is_read():
    async def main():
        lis = await ChannelListener.start("127.0.0.1")
        seen: list = []
        stream = lis.open(lambda a: Call(lambda _a: asyncio.sleep(3600), a))
        stream._q.put_nowait = seen.append  # anything delivered to the stream shows here
        r, w = await asyncio.open_connection("127.0.0.1", lis.port)
        w.write(b"x" * SECRET_BYTES)
        payload = b"\x80\x05N."  # a pickle; must never be loaded
        w.write(token_channel._HEADER.pack(len(payload), 1) + payload)
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the listener
        assert lis.rejected_connections == 1
        assert seen == []
        w.close()
        stream.cancel()
        await lis.close()

    run(main())


def test_sending_to_a_listener_that_is_gone_raises_so_the_replica_aborts():
    async def main():
        async with channel() as (lis, sender):
            addrs = []
            stream = lis.open(
                lambda a: (addrs.append(a), Call(lambda _a: asyncio.sleep(3600), a))[1]
            )
            await sender.send(addrs[0], delta(0))
            await stream.__anext__()
            stream.cancel()
            await lis.close()
            with pytest.raises(ConnectionError):
                for i in range(200):  # the peer's reset shows on a later write
                    await sender.send(addrs[0], delta(i))
                    await asyncio.sleep(0.01)

    run(main())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_listener_is_reported_once_then_skipped(monkeypatch):
    from rayfleet.cluster.token_channel import ChannelAddress, ChannelUnreachable

    tries = []
    real_open = asyncio.open_connection

    async def counting_open(*a, **kw):
        tries.append(a)
        return await real_open(*a, **kw)

    monkeypatch.setattr(asyncio, "open_connection", counting_open)

    async def main():
        sender = ChannelSender()
        addr = ChannelAddress("127.0.0.1", free_port(), b"s" * SECRET_BYTES, 1)
        for _ in range(3):
            with pytest.raises(ChannelUnreachable):
                await sender.send(addr, delta(0))
        assert len(tries) == 1  # later sends do not wait on a connect again

    run(main())


def test_deltas_the_call_yields_itself_reach_the_stream_too():
    """The replica's fallback when it cannot reach the channel: the handle's own items."""

    class YieldingCall:
        def __init__(self, items):
            self.items = list(items)

        def __aiter__(self):
            return self

        async def __anext__(self):
            if not self.items:
                raise StopAsyncIteration
            await asyncio.sleep(0)
            return self.items.pop(0)

        def cancel(self):
            pass

    async def main():
        async with channel() as (lis, _):
            items = [delta(0), delta(1), delta(2, finished=True)]
            got = await drain(lis.open(lambda a: YieldingCall(items)))
            assert [d.samples[0].token_ids[0] for d in got] == [0, 1, 2]
            assert lis.open_streams == 0

    run(main())


def test_the_replica_yields_through_the_handle_when_the_channel_is_unreachable():
    """`LLMServer.generate` with a request naming a listener nobody runs: the deltas come
    out as the call's items, in order, none lost."""
    from rayfleet.cluster.llm_server import GenerateRequest, LLMServer
    from rayfleet.cluster.token_channel import ChannelAddress
    from rayfleet.engine import SamplingParams

    class Scripted(LLMServer):
        def __del__(self):  # Serve awaits the real (async) one; there is no engine here
            pass

    server = Scripted.__new__(Scripted)  # no engine: `_deltas` is scripted below
    server._channel = ChannelSender()

    async def scripted(req):
        for i in range(4):
            yield delta(i, finished=i == 3)

    server._deltas = scripted
    addr = ChannelAddress("127.0.0.1", free_port(), b"s" * SECRET_BYTES, 1)
    req = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=4), channel=addr)

    async def main():
        return [d async for d in server.generate(req)]

    got = run(main())
    assert [d.samples[0].token_ids[0] for d in got] == [0, 1, 2, 3]
