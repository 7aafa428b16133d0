"""The kv-aware router on real replicas: a hot prefix spreads, a killed replica is dropped.

One local Ray cluster for the module (`ray` marker; run with
`pytest -m ray tests/test_kv_router_live.py` inside a loopback-only network namespace), two
replicas of the default model with small KV pools and an 8-token step budget, so prefills
take many engine steps: a request can be caught on a replica before its first token.

The router's view is read through `Ingress.router_debug` (a DeploymentHandle call to the
ingress replica: per LLMServer replica its indexed prefix blocks and load, and how many
requests the ingress re-issued after their replica died); which replica served a request,
from the replicas' `rayfleet.request` log lines.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.ray

APP = "live"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def cluster():
    from rayfleet.cluster.testing import cpu_replicas_config, deploy_app, local_serve_cluster

    with local_serve_cluster(prefix="rflive", skip=pytest.skip) as c:
        deploy_app(
            cpu_replicas_config(
                c.model_path,
                num_kv_blocks=192,
                engine={"max_num_batched_tokens": 8},
                # The controller's own health check is slow (10 s): dropping a dead replica
                # at once is the router's doing.
                replica={"health_check_period_s": 10},
                # The cost's load terms off: placement follows the cache alone, up to the
                # hot-prefix load bound (the default eps 0.5), which is what spreads load.
                router={
                    "weights": {
                        "queued_prefill_token": 0,
                        "running_request": 0,
                        "waiting_request": 0,
                    }
                },
            ),
            APP,
        )
        yield c


def router_debug() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name=APP).router_debug.remote().result()


async def router_debug_async() -> dict[str, Any]:
    return await asyncio.to_thread(router_debug)


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def replicas_of(cluster, ids: list[str]) -> list[str | None]:
    from rayfleet.cluster.testing import request_replicas

    return await asyncio.to_thread(request_replicas, cluster.temp_dir, APP, ids)


async def complete(h: httpx.AsyncClient, cluster, prompt: str, max_tokens: int = 1) -> dict:
    r = await h.post(
        cluster.base + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()


# ---- a hot prefix ------------------------------------------------------------------------
def test_a_hot_prefix_sticks_to_one_replica_alone_and_spreads_under_concurrent_load(cluster):
    prefix = words("hot", 60)  # 170 tokens: 10 blocks

    async def main():
        async with httpx.AsyncClient(timeout=120) as h:
            seq = []
            for i in range(4):  # one at a time: each lands where the prefix is cached
                seq.append((await complete(h, cluster, f"{prefix} q{i}:", 2))["id"])
                await asyncio.sleep(0.6)  # reports (0.25 s) carry the KV events
            burst = await asyncio.gather(
                *(complete(h, cluster, f"{prefix} burst {i}:", 16) for i in range(8))
            )
            return await replicas_of(cluster, seq), await replicas_of(
                cluster, [b["id"] for b in burst]
            )

    seq, burst = asyncio.run(main())
    assert None not in seq and None not in burst, (seq, burst)
    assert len(set(seq)) == 1, seq
    # Past the load bound the router sends the prefix elsewhere: both replicas serve it.
    assert len(set(burst)) == 2, burst
    assert burst.count(seq[0]) >= 3, (seq, burst)  # the first three go where it is cached
    state = router_debug()["router"]["replicas"]
    assert all(r["indexed_blocks"] >= 10 for r in state.values()), state


# ---- a replica killed mid-run ------------------------------------------------------------
@dataclass
class Outcome:
    status: int = 0
    first_at: float | None = None  # when the response began (for SSE: the first token)
    events: list = field(default_factory=list)  # SSE data payloads; "[DONE]" as is
    body: Any = None  # a JSON response
    event_times: list = field(default_factory=list)

    def had_token_before(self, t: float) -> bool:
        return self.first_at is not None and self.first_at < t

    def events_after(self, t: float) -> int:
        return sum(1 for at in self.event_times if at > t)

    @property
    def stream_ok(self) -> bool:
        return (
            self.status == 200
            and self.events[-1:] == ["[DONE]"]
            and not any("error" in e for e in self.events[:-1])
            and any(
                c.get("finish_reason") == "length" for e in self.events[:-1] for c in e["choices"]
            )
        )

    @property
    def stream_failed_cleanly(self) -> bool:
        ev = self.events
        return (
            self.status == 200
            and len(ev) >= 2
            and ev[-1] == "[DONE]"
            and isinstance(ev[-2], dict)
            and {"message", "type"} <= set(ev[-2].get("error", {}))
            and not any("error" in e for e in ev[:-2])
        )

    @property
    def json_ok(self) -> bool:
        return self.status == 200 and self.body["choices"][0]["finish_reason"] == "length"

    @property
    def json_failed_cleanly(self) -> bool:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return self.status >= 500 and isinstance(err, dict) and bool(err.get("message"))


async def send(h: httpx.AsyncClient, url: str, body: dict, out: Outcome) -> Outcome:
    if not body.get("stream"):
        r = await h.post(url, json=body)
        out.status, out.first_at, out.body = r.status_code, time.monotonic(), r.json()
        return out
    async with h.stream("POST", url, json=body) as r:
        out.status, out.first_at = r.status_code, time.monotonic()
        if r.status_code != 200:
            out.body = json.loads(await r.aread())
            return out
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.events.append(data if data == "[DONE]" else json.loads(data))
                out.event_times.append(time.monotonic())
    return out


def replica_actor(rid: str):
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA") and a["name"].endswith("#" + rid):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no actor for replica {rid}")


def test_a_killed_replica_leaves_the_router_its_streams_fail_cleanly_unstarted_ones_retry(
    cluster,
):
    import ray

    url = cluster.base + "/v1/completions"

    def body(prompt: str, max_tokens: int, stream: bool = True) -> dict:
        return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": stream}  # fmt: skip

    async def main():
        async with httpx.AsyncClient(timeout=300) as h:

            def start(b: dict) -> tuple[Outcome, asyncio.Task]:
                o = Outcome()
                return o, asyncio.create_task(send(h, url, b, o))

            # Two prefixes, each cached on its own replica: requests follow them there.
            x = words("xray", 32)
            (victim,) = await replicas_of(cluster, [(await complete(h, cluster, x))["id"]])
            y = survivor = None
            for k in range(8):
                cand = words(f"yo{k}x", 32)
                (rep,) = await replicas_of(cluster, [(await complete(h, cluster, cand))["id"]])
                if rep != victim:
                    y, survivor = cand, rep
                    break
            assert y is not None, "no prefix landed on the other replica"
            state = await router_debug_async()
            assert set(state["router"]["replicas"]) == {victim, survivor}, state
            retries_before = state["replica_retries"]

            # Long decodes on both replicas: two streams and one plain request per prefix.
            dec: dict[str, list] = {x: [], y: []}
            for i in range(3):
                for p in (x, y):
                    dec[p].append(start(body(f"{p} story {i}:", 300, i < 2)))
                    await asyncio.sleep(0.2)  # placed in this order: loads stay level
            streams = [o for p in (x, y) for o, _ in dec[p][:2]]
            await wait_for(lambda: all(o.first_at for o in streams), 120)
            await wait_load(victim, 3)  # its plain request too
            # A long prompt (many 8-token steps of prefill) that has produced nothing yet.
            pend, pend_task = start(body(f"{x} {words('w0z', 40)}", 4))
            await wait_load(victim, 4)
            ray.kill(replica_actor(victim), no_restart=True)
            killed_at = time.monotonic()

            # The router drops it at once (the controller's health check comes every 10 s).
            async def dropped() -> bool:
                r = (await router_debug_async())["router"]
                return victim not in r["replicas"] and victim not in r["serve_replicas"]

            await wait_for(dropped, 8)
            dropped_after = time.monotonic() - killed_at
            # The victim's requests end, with an error; the survivor's go on producing.
            await asyncio.wait_for(asyncio.gather(*(t for _, t in dec[x])), 180)
            await wait_for(lambda: all(o.events_after(killed_at) for o, _ in dec[y][:2]), 60)
            for _, t in dec[y]:
                t.cancel()  # enough: the client goes away
            await asyncio.gather(*(t for _, t in dec[y]), return_exceptions=True)
            await asyncio.wait_for(pend_task, 180)
            retries = (await router_debug_async())["replica_retries"] - retries_before

            # Afterwards requests for the victim's prefix go elsewhere, none is re-issued, and
            # the victim never comes back into the router (the controller may still list it
            # until its health check).
            after = await asyncio.gather(
                *(complete(h, cluster, f"{x} after {i}:", 2) for i in range(3))
            )
            back = []
            for _ in range(10):
                back.append(not await dropped())
                await asyncio.sleep(0.3)
            retries_after = (await router_debug_async())["replica_retries"] - retries_before
            logs = cluster.temp_dir / "session_latest" / "logs" / "serve"
            reissued = [
                ln
                for f in logs.glob(f"replica_{APP}_Ingress_*.log")
                for ln in f.read_text(errors="replace").splitlines()
                if "re-issuing it" in ln
            ]
            return SimpleNamespace(
                killed_at=killed_at, dropped_after=dropped_after, on_victim=dec[x],
                on_survivor=dec[y], pend=pend, retries=retries, retries_after=retries_after,
                after=after, back=back, reissued=reissued,
            )  # fmt: skip

    run = asyncio.run(main())
    assert run.dropped_after < 8
    # The victim's streams that had begun end with a clean error: an SSE error event then
    # [DONE]. Its plain request, whose client had received nothing, is re-issued whole and
    # succeeds.
    for o, _ in run.on_victim[:2]:
        assert o.stream_failed_cleanly, (o.status, o.events[-3:])
    plain = run.on_victim[2][0]
    assert plain.json_ok, (plain.status, plain.body)
    assert plain.body["usage"]["completion_tokens"] == 300
    # The survivor's streams went on without an error until the client left.
    for o, _ in run.on_survivor[:2]:
        assert o.status == 200 and not any("error" in e for e in o.events if e != "[DONE]")
    # The request with no token yet when its replica died is re-issued and succeeds.
    pend = run.pend
    assert not pend.had_token_before(run.killed_at), "the long prompt produced a token too soon"
    assert pend.stream_ok, (pend.status, pend.events[-3:])
    assert run.retries == 2
    # Their log lines: one re-issue each.
    for rid in (pend.events[0]["id"], plain.body["id"]):
        assert sum(rid in ln for ln in run.reissued) == 1, (rid, run.reissued)
    assert len(run.reissued) == 2, run.reissued
    assert len(run.after) == 3 and run.retries_after == run.retries
    assert not any(run.back), run.back


async def wait_for(cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        ok = cond()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s"
        await asyncio.sleep(0.05)


async def wait_load(rid: str, n: int, timeout_s: float = 30) -> None:
    """Until the router's view of `rid` shows at least `n` running or waiting requests."""

    async def loaded() -> bool:
        load = (await router_debug_async())["router"]["replicas"][rid]
        return load["num_running"] + load["num_waiting"] >= n

    await wait_for(loaded, timeout_s)
