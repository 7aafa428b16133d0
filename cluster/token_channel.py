"""The token channel: a replica streams a request's deltas to its ingress over plain TCP.

Why: every streamed item through a Serve `DeploymentHandle` costs CPU in Ray's core-worker
and gRPC threads of both processes, and on a small CPU machine that CPU is taken from the
engine's threads, so it shows up in every inter-token gap. Measured on 2 cores
(`/proc/*/task/*/stat` during a 400-token stream minus an idle window as long): the
ingress's CPU per token was ~0.95 ms with Serve stream items and ~0.5 ms over this channel.

What stays on Serve: placement (the request router runs in the handle call, so the replica
is chosen exactly as before), the replica's ongoing-request count (the handle call lasts
as long as the request), cancellation (cancelling the handle call cancels the replica's
`generate`, which aborts the engine request and frees its blocks), and failure: a replica
that dies fails the handle call with Ray's actor error, which `retry.py` handles as before.
Only the deltas travel here. The replica's `generate` then yields nothing through Serve,
unless it cannot reach the listener (a firewall, a network policy): then it yields that
request's deltas through the handle as before, and the ingress reads them from there.

Direction: the ingress listens (one listener per ingress replica, on its node's address,
an ephemeral port) and the replica connects to it, because only the handle's router knows
which replica will take a request. Each request carries a `ChannelAddress` (host, port, a
per-listener secret, a fresh stream id). A replica keeps one connection per listener and
sends the secret first; the listener drops a connection whose first 32 bytes are not its
secret before reading anything else (frames are pickles, so only a peer that holds the
secret, which travels inside Ray's own request, is ever unpickled).

Frames: 12 bytes of header (payload length, stream id; big-endian) then a pickled
`StreamDelta`. TCP keeps one connection's frames in order. The handle call returns only
after its frames were written, but the two travel on different connections, so the
ingress keeps reading the channel after the call ends until the finished delta arrives
(`FRAMES_AFTER_RETURN_TIMEOUT_S` bounds that wait; it only passes if frames were lost).

No ray import: the ingress and the replica pass in the handle response and their address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import pickle
import secrets
import struct
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve")

SECRET_BYTES = 32
_HEADER = struct.Struct(">IQ")  # payload length, stream id
MAX_FRAME_BYTES = 256 << 20
# How long the ingress waits, after the replica's call returned, for frames still in flight
# on the channel. Loopback or a LAN delivers them in microseconds; this is a bound for a
# lost frame (a bug), not a delay anyone waits in practice.
FRAMES_AFTER_RETURN_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# After a failed connect, requests to that listener go through the handle for this long
# without trying again (each try would hold a request's first token for up to the timeout).
UNREACHABLE_FOR_S = 60.0


class ChannelError(ConnectionError):
    """The channel lost a stream's frames or its connection."""


class ChannelUnreachable(ChannelError):
    """The replica cannot connect to the ingress's listener (a firewall, a network policy):
    it sends that request's deltas through the handle instead."""


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    """Where a replica sends one request's deltas (travels inside `GenerateRequest`)."""

    host: str
    port: int
    secret: bytes
    stream_id: int


# -- ingress side ----------------------------------------------------------------------------


_END = object()  # the handle call returned


class ChannelListener:
    """The ingress's end: accepts replicas' connections and hands each frame to the stream
    it names. Runs on the event loop that creates it (the ingress's)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0  # set by `start`
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.base_events.Server | None = None
        self._streams: dict[int, asyncio.Queue] = {}
        self._conns: set[asyncio.StreamWriter] = set()
        self.rejected_connections = 0
        self.streams_opened = 0  # also the last stream id handed out

    @classmethod
    async def start(cls, host: str) -> ChannelListener:
        """Listen on `host` (an ephemeral port), the address replicas connect to."""
        lis = cls(host)
        lis._server = await asyncio.start_server(lis._serve_conn, host, 0)
        lis.port = lis._server.sockets[0].getsockname()[1]
        return lis

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def open(self, start_call) -> ChannelStream:
        """Register a new stream, then start the request with `start_call(address)` (which
        returns the handle response: an async iterator with `cancel()`)."""
        self.streams_opened += 1
        sid = self.streams_opened
        q: asyncio.Queue = asyncio.Queue()
        self._streams[sid] = q
        try:
            call = start_call(ChannelAddress(self.host, self.port, self.secret, sid))
        except BaseException:
            del self._streams[sid]
            raise
        return ChannelStream(self, sid, q, call)

    def _close_stream(self, sid: int) -> None:
        self._streams.pop(sid, None)

    async def _serve_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            hello = await r.readexactly(SECRET_BYTES)
            if not hmac.compare_digest(hello, self.secret):
                self.rejected_connections += 1
                logger.warning("rayfleet token channel: dropped a connection with a wrong secret")
                return
            self._conns.add(w)
            while True:
                length, sid = _HEADER.unpack(await r.readexactly(_HEADER.size))
                if length > MAX_FRAME_BYTES:
                    logger.error("rayfleet token channel: frame of %d bytes; closing", length)
                    return
                payload = await r.readexactly(length)
                q = self._streams.get(sid)
                if q is not None:  # else its request was cancelled: drop the frame
                    q.put_nowait(pickle.loads(payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the replica closed it (or died: its handle calls fail on their own)
        finally:
            self._conns.discard(w)
            w.close()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for w in list(self._conns):
            w.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()


class ChannelStream:
    """One request's deltas, read from the channel, failing as its handle call fails. Used
    where the ingress used the handle's streaming response: `async for`, `cancel()`."""

    def __init__(self, listener: ChannelListener, sid: int, q: asyncio.Queue, call: Any):
        self._listener = listener
        self._sid = sid
        self._q = q
        self._call = call
        self._ended = False  # the handle call returned
        self._finished = False
        self._watch = asyncio.get_running_loop().create_task(self._watch_call())

    async def _watch_call(self) -> None:
        """Wait for the handle call to end and put its outcome on the stream's queue."""
        try:
            # Nothing comes here unless the replica could not reach the channel.
            async for item in self._call:
                self._q.put_nowait(item)
            self._q.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._q.put_nowait(e)

    def __aiter__(self) -> ChannelStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        while True:
            if self._ended:
                try:
                    item = await asyncio.wait_for(self._q.get(), FRAMES_AFTER_RETURN_TIMEOUT_S)
                except TimeoutError:
                    self.cancel()
                    raise ChannelError(
                        f"the replica finished stream {self._sid} but its last frames never "
                        f"arrived on the token channel"
                    ) from None
            else:
                item = await self._q.get()
            if item is _END:
                self._ended = True
                continue
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            if getattr(item, "finished", False):
                self._finished = True
                self._listener._close_stream(self._sid)
            return item

    def cancel(self) -> None:
        """Stop the request (cancelling the handle call aborts it in the engine) and forget
        the stream; frames still arriving for it are dropped. A stream whose finished delta
        arrived is left to end on its own: the engine is done with it, and the replica is
        still writing its log line and metrics."""
        self._listener._close_stream(self._sid)
        if self._finished:
            return
        if not self._watch.done():
            self._watch.cancel()
        self._call.cancel()


# -- replica side ----------------------------------------------------------------------------


class ChannelSender:
    """The replica's end: one connection per ingress listener, opened on first use and kept.
    Frames from concurrent requests are whole `write` calls on the one event loop, so they
    never interleave."""

    def __init__(self) -> None:
        self._conns: dict[tuple[str, int], asyncio.StreamWriter] = {}
        self._opening: dict[tuple[str, int], asyncio.Future] = {}
        self._unreachable: dict[tuple[str, int], float] = {}  # listener -> retry after

    async def _writer(self, addr: ChannelAddress) -> asyncio.StreamWriter:
        key = (addr.host, addr.port)
        w = self._conns.get(key)
        if w is not None and not w.is_closing():
            return w
        loop = asyncio.get_running_loop()
        if self._unreachable.get(key, 0.0) > loop.time():
            raise ChannelUnreachable(f"token channel {key[0]}:{key[1]} was unreachable")
        pending = self._opening.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = loop.create_future()
        self._opening[key] = fut
        try:
            # asyncio sets TCP_NODELAY itself: a frame goes out as soon as it is written.
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection(addr.host, addr.port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as e:
                self._unreachable[key] = loop.time() + UNREACHABLE_FOR_S
                logger.warning(
                    "rayfleet token channel: cannot reach the ingress at %s:%d (%s); its "
                    "streams go through Serve's handle for %.0f s",
                    *key, e, UNREACHABLE_FOR_S,
                )  # fmt: skip
                raise ChannelUnreachable(f"token channel {key[0]}:{key[1]}: {e}") from e
            w.write(addr.secret)
            self._conns[key] = w
            fut.set_result(w)
            return w
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._opening[key]

    async def send(self, addr: ChannelAddress, delta: Any) -> None:
        """Write one delta; `ChannelUnreachable` when the listener cannot be reached (nothing
        was written), another `ConnectionError` when an open connection broke."""
        payload = pickle.dumps(delta, protocol=pickle.HIGHEST_PROTOCOL)
        w = await self._writer(addr)
        w.write(_HEADER.pack(len(payload), addr.stream_id) + payload)
        await w.drain()  # back-pressure from a slow ingress; raises if the connection broke

    async def close(self) -> None:
        for w in self._conns.values():
            w.close()
        self._conns.clear()


__all__ = [
    "ChannelAddress",
    "ChannelError",
    "ChannelListener",
    "ChannelSender",
    "ChannelStream",
    "ChannelUnreachable",
]
