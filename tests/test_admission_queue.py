"""AdmissionQueue: one bounded fleet-wide queue, FIFO with priorities, late binding."""

from __future__ import annotations

import asyncio

import pytest
from rayfleet.cluster.router_config import AdmissionQueueConfig
from rayfleet.cluster.routing_policy import AdmissionQueue, QueueFull


class Slots:
    """A fleet with `free` places; try_place takes one (late binding) or returns None."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.order: list[str] = []

    def placer(self, name: str):
        def try_place():
            if self.free <= 0:
                return None
            self.free -= 1
            self.order.append(name)
            return f"replica-for-{name}"

        return try_place


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---- async (the router) ----------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_request_binds_at_once_when_a_replica_has_room():
    q = AdmissionQueue()
    slots = Slots(free=1)
    assert await q.wait(slots.placer("a")) == "replica-for-a"
    assert len(q) == 0 and q.stats().admitted_total == 1 and q.stats().queued_total == 0


@pytest.mark.asyncio
async def test_waiters_bind_in_arrival_order_as_capacity_appears():
    q = AdmissionQueue()
    slots = Slots(free=0)
    tasks = [asyncio.create_task(q.wait(slots.placer(n))) for n in "abc"]
    await settle()
    assert len(q) == 3 and not any(t.done() for t in tasks)
    slots.free = 2
    assert q.notify() == 2
    await settle()
    assert slots.order == ["a", "b"] and tasks[0].done() and tasks[1].done()
    assert not tasks[2].done() and len(q) == 1
    slots.free = 1
    q.notify()
    assert await tasks[2] == "replica-for-c"


@pytest.mark.asyncio
async def test_lower_priority_value_goes_first_fifo_within_a_priority():
    q = AdmissionQueue()
    slots = Slots(free=0)
    tasks = [
        asyncio.create_task(q.wait(slots.placer(name), priority=prio))
        for name, prio in [("low1", 5), ("hi1", 0), ("low2", 5), ("hi2", 0)]
    ]
    await settle()
    slots.free = 4
    q.notify()
    await asyncio.gather(*tasks)
    assert slots.order == ["hi1", "hi2", "low1", "low2"]


@pytest.mark.asyncio
async def test_a_newcomer_does_not_jump_the_queue_when_capacity_appears_unannounced():
    q = AdmissionQueue()
    slots = Slots(free=0)
    first = asyncio.create_task(q.wait(slots.placer("first")))
    await settle()
    slots.free = 1  # nobody called notify(); the newcomer's arrival does
    second = asyncio.create_task(q.wait(slots.placer("second")))
    await settle()
    assert first.done() and not second.done()
    assert slots.order == ["first"]
    second.cancel()


@pytest.mark.asyncio
async def test_a_full_queue_raises_queue_full_with_retry_after():
    q = AdmissionQueue(max_len=2, min_retry_after_s=2.0, max_retry_after_s=30.0)
    slots = Slots(free=0)
    tasks = [asyncio.create_task(q.wait(slots.placer(n))) for n in "ab"]
    await settle()
    with pytest.raises(QueueFull) as err:
        await q.wait(slots.placer("c"))
    assert err.value.retry_after_s == 2.0 and err.value.retry_after_header == "2"
    assert err.value.queue_len == 2
    assert q.stats().rejected_total == 1
    for t in tasks:
        t.cancel()


@pytest.mark.asyncio
async def test_a_request_whose_client_left_is_dropped_from_the_queue():
    q = AdmissionQueue()
    slots = Slots(free=0)
    gone = asyncio.create_task(q.wait(slots.placer("gone")))
    stays = asyncio.create_task(q.wait(slots.placer("stays")))
    await settle()
    gone.cancel()
    await settle()
    assert len(q) == 1 and q.stats().dropped_total == 1
    slots.free = 5
    q.notify()
    assert await stays == "replica-for-stays"
    assert slots.order == ["stays"]


@pytest.mark.asyncio
async def test_a_placement_made_for_a_cancelled_waiter_is_released():
    q = AdmissionQueue()
    slots = Slots(free=0)
    released = []
    task = asyncio.create_task(q.wait(slots.placer("a"), release=released.append))
    await settle()
    slots.free = 1
    q.notify()  # binds: the future has its result ...
    task.cancel()  # ... but the client leaves before the waiter resumes
    with pytest.raises(asyncio.CancelledError):
        await task
    assert released == ["replica-for-a"]


@pytest.mark.asyncio
async def test_a_request_queued_past_max_wait_gets_queue_full():
    q = AdmissionQueue(max_wait_s=0.01)
    with pytest.raises(QueueFull) as err:
        await q.wait(Slots(free=0).placer("a"))
    assert err.value.reason == "timeout"
    assert len(q) == 0 and q.stats().timed_out_total == 1


def test_from_config_takes_the_config_fields():
    q = AdmissionQueue.from_config(
        AdmissionQueueConfig(max_len=3, min_retry_after_s=2, max_retry_after_s=9, max_wait_s=4)
    )
    assert (q.max_len, q.min_retry_after_s, q.max_retry_after_s, q.max_wait_s) == (3, 2, 9, 4)


# ---- sync core (the simulator) ---------------------------------------------------------
def test_drain_binds_in_order_until_one_does_not_fit():
    q: AdmissionQueue[int] = AdmissionQueue()
    for size in (1, 5, 1):
        q.push(size)
    room = [3]

    def bind(size: int) -> bool:
        if size > room[0]:
            return False
        room[0] -= size
        return True

    assert q.drain(bind) == 1  # 1 binds; 5 does not fit and the later 1 waits behind it
    assert len(q) == 2


def test_wait_times_and_queue_length_are_metrics():
    now = [0.0]
    seen = []
    q: AdmissionQueue[str] = AdmissionQueue(clock=lambda: now[0], on_wait=seen.append)
    q.push("a")
    now[0] = 1.0
    q.push("b")
    assert q.stats().length == 2
    now[0] = 3.0
    q.drain(lambda item: True)
    s = q.stats()
    assert seen == [3.0, 2.0]
    assert s.length == 0 and s.admitted_total == 2 and s.wait_max_s == 3.0
    assert s.wait_p50_s in (2.0, 3.0)


def test_retry_after_grows_with_the_queue_and_stays_within_its_bounds():
    now = [0.0]
    q: AdmissionQueue[str] = AdmissionQueue(
        min_retry_after_s=1.0, max_retry_after_s=20.0, clock=lambda: now[0]
    )
    assert q.retry_after_s() == 1.0  # nothing bound yet: the floor
    for i in range(3):  # binds every 2 s
        now[0] = 2.0 * i
        q.push("x")
        q.drain(lambda item: True)
    for _ in range(4):
        q.push("y")
    assert q.retry_after_s() == pytest.approx(2.0 * 5)
    for _ in range(10):
        q.push("z")
    assert q.retry_after_s() == 20.0


def test_expire_removes_items_older_than_max_wait():
    now = [0.0]
    q: AdmissionQueue[str] = AdmissionQueue(max_wait_s=5.0, clock=lambda: now[0])
    q.push("old")
    now[0] = 3.0
    q.push("young")
    now[0] = 6.0
    assert q.expire() == ["old"]
    assert len(q) == 1 and q.stats().timed_out_total == 1


def test_an_item_whose_client_is_gone_is_skipped_by_drain():
    q: AdmissionQueue[str] = AdmissionQueue()
    q.push("gone", is_gone=lambda: True)
    q.push("here")
    got = []
    q.drain(lambda item: got.append(item) or True)
    assert got == ["here"] and q.stats().dropped_total == 1


def test_remove_takes_a_ticket_out_once():
    q: AdmissionQueue[str] = AdmissionQueue()
    t = q.push("a")
    assert q.remove(t) is True and q.remove(t) is False
    assert len(q) == 0


def test_a_zero_length_queue_rejects_everything_and_bad_bounds_are_value_errors():
    with pytest.raises(QueueFull):
        AdmissionQueue(max_len=0).push("a")
    with pytest.raises(ValueError, match="max_len"):
        AdmissionQueue(max_len=-1)
    with pytest.raises(ValueError, match="retry_after"):
        AdmissionQueue(min_retry_after_s=5, max_retry_after_s=1)
