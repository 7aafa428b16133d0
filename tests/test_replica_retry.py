"""Re-issuing a request whose replica died before its first token (`rayfleet.cluster.retry`).

No cluster: the streams are fakes raising Ray's own exception classes. The same path on real
replicas (a replica killed mid-run) is in tests/test_kv_router_live.py.
"""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError
from rayfleet.cluster.config import RayfleetConfig
from rayfleet.cluster.ingress import Ingress
from rayfleet.cluster.protocol import ProtocolError
from rayfleet.cluster.retry import ReplicaRetry, replica_gone
from rayfleet.cluster.routing_policy import QueueFull


class FakeStream:
    """A streaming handle response: yields items, raising the exceptions among them."""

    def __init__(self, items):
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class Replicas:
    """`start()` hands out the next scripted stream, as the handle does per call."""

    def __init__(self, *scripts):
        self.streams = [FakeStream(s) for s in scripts]
        self.calls = 0

    def start(self):
        s = self.streams[self.calls]
        self.calls += 1
        return s


def run(coro):
    return asyncio.run(coro)


def test_a_replica_dying_before_the_first_token_is_retried_on_the_next_call():
    reps = Replicas([ActorDiedError()], ["tok1", "tok2"])
    retry = ReplicaRetry(max_retries=2)
    first, stream = run(retry.first_item(reps.start, "r1"))
    assert first == "tok1" and stream is reps.streams[1]
    assert reps.calls == 2 and retry.retries == 1
    assert reps.streams[0].cancelled and not reps.streams[1].cancelled


@pytest.mark.parametrize(
    "err",
    [
        ActorDiedError(),
        ActorUnavailableError("unavailable", None),
        ReplicaUnavailableError("r-1"),
        RayTaskError("generate", "tb", ActorDiedError()),
    ],
    ids=["died", "unavailable", "serve-replica-unavailable", "wrapped"],
)
def test_every_kind_of_replica_death_counts(err):
    assert replica_gone(err)
    reps = Replicas([err], ["tok"])
    assert run(ReplicaRetry(1).first_item(reps.start))[0] == "tok"


@pytest.mark.parametrize(
    "err",
    [QueueFull(3, 1.0), ValueError("bad prompt"), RayTaskError("generate", "tb", ValueError())],
    ids=["queue-full", "value-error", "task-error"],
)
def test_other_errors_are_raised_at_once(err):
    assert not replica_gone(err)
    reps = Replicas([err], ["tok"])
    retry = ReplicaRetry(2)
    with pytest.raises(type(err)):
        run(retry.first_item(reps.start))
    assert reps.calls == 1 and retry.retries == 0 and reps.streams[0].cancelled


def test_retries_are_bounded():
    reps = Replicas(*([ActorDiedError()] for _ in range(5)))
    retry = ReplicaRetry(max_retries=2)
    with pytest.raises(ActorDiedError):
        run(retry.first_item(reps.start))
    assert reps.calls == 3 and retry.retries == 2


def test_zero_retries_raises_the_first_death():
    reps = Replicas([ActorDiedError()], ["tok"])
    with pytest.raises(ActorDiedError):
        run(ReplicaRetry(0).first_item(reps.start))
    assert reps.calls == 1


def test_a_death_after_the_first_token_is_never_retried():
    reps = Replicas(["tok1", ActorDiedError()], ["other"])
    retry = ReplicaRetry(2)

    async def main():
        first, stream = await retry.first_item(reps.start)
        with pytest.raises(ActorDiedError):  # the caller sees it: an error event, or a 5xx
            await stream.__anext__()
        return first

    assert run(main()) == "tok1"
    assert reps.calls == 1 and retry.retries == 0


def test_max_replica_retries_is_in_the_server_config():
    assert RayfleetConfig().server.max_replica_retries == 2
    assert RayfleetConfig(server={"max_replica_retries": 0}).server.max_replica_retries == 0
    with pytest.raises(ValueError, match="max_replica_retries"):
        RayfleetConfig(server={"max_replica_retries": -1})


# ---- a non-streaming request: re-issued whole when its replica dies mid-way -------------------
class Delta:
    def __init__(self, k: int, finished: bool = False):
        self.k, self.finished = k, finished


class NonStreaming:
    """Just what `Ingress.collect` uses of the ingress: its retry policy, `iterate` and
    `start_many` (here handing out the next scripted stream per prompt)."""

    iterate = staticmethod(Ingress.iterate)

    def __init__(self, max_retries: int, *scripts):
        self._retry = ReplicaRetry(max_retries)
        self.replicas = Replicas(*scripts)

    async def start_many(self, greqs):
        started = []
        for _ in greqs:
            s = self.replicas.start()
            started.append((await s.__anext__(), s))
        return started


def collect(ing: NonStreaming, greqs):
    async def go():
        return await Ingress.collect(ing, greqs, await ing.start_many(greqs))

    return run(go())


GREQ = type("G", (), {"request_id": "cmpl-1"})()


def test_a_non_streaming_request_whose_replica_dies_mid_way_is_sent_again_whole():
    ing = NonStreaming(2, [Delta(1), Delta(2), ActorDiedError()], [Delta(1), Delta(2, True)])
    items = collect(ing, [GREQ])
    # Only the second try's deltas: nothing of the dead replica's answer is mixed in.
    assert [(p, d.k, d.finished) for p, d in items] == [(0, 1, False), (0, 2, True)]
    assert ing._retry.retries == 1 and ing.replicas.streams[0].cancelled


def test_a_non_streaming_request_fails_cleanly_once_its_retries_are_spent():
    ing = NonStreaming(
        1, [Delta(1), ActorDiedError()], [Delta(1), ActorUnavailableError("gone", None)]
    )
    with pytest.raises(ProtocolError) as e:
        collect(ing, [GREQ])
    assert e.value.status == 503 and "died after 2 tries" in str(e.value)
    assert ing._retry.retries == 1


def test_a_non_streaming_request_is_not_re_sent_for_other_errors():
    ing = NonStreaming(2, [Delta(1), ValueError("engine bug")])
    with pytest.raises(ValueError, match="engine bug"):
        collect(ing, [GREQ])
    assert ing._retry.retries == 0 and ing.replicas.calls == 1


def test_a_multi_prompt_request_is_re_sent_whole_and_its_live_streams_cancelled():
    ing = NonStreaming(
        2,
        [Delta(1), ActorDiedError()],  # prompt 0's replica dies
        [Delta(5), Delta(6, True)],  # prompt 1's, alive: cancelled, then sent again
        [Delta(1), Delta(2, True)],
        [Delta(5), Delta(6, True)],
    )
    items = collect(ing, [GREQ, GREQ])
    assert sorted((p, d.k) for p, d in items) == [(0, 1), (0, 2), (1, 5), (1, 6)]
    assert ing.replicas.calls == 4 and ing.replicas.streams[1].cancelled
