"""Re-issuing a request whose replica died before it produced anything.

The ingress starts every request by awaiting the first item of the replica's stream (the
first item carries the first token). If the replica dies before that item arrives, nothing
has reached the client yet and the request can simply be sent again: Serve's router has
already dropped the dead replica (`KVAwareRequestRouter.on_replica_actor_died`), so the
request lands on another one. Once an item has arrived the request is never re-issued: a
stream that fails later ends with an error (an SSE `error` event then `[DONE]`, or a 5xx
JSON body), never with tokens repeated or mixed from two replicas. A non-streaming request is
the exception: nothing reaches its client before the whole answer, so when its replica dies
mid-way the ingress sends the whole request again (`Ingress.collect`, same bound).

What counts as a dead replica: Ray's actor errors (`RayActorError`: `ActorDiedError`,
`ActorUnavailableError`), also when wrapped in a `RayTaskError`, and Serve's
`ReplicaUnavailableError`. Anything else (a 400 from the engine, a full queue, a cancelled
client) is raised at once. `server.max_replica_retries` (default 2) bounds the re-issues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

logger = logging.getLogger("ray.serve")

REPLICA_GONE_ERRORS: tuple[type[BaseException], ...] = (RayActorError, ReplicaUnavailableError)


def replica_gone(e: BaseException) -> bool:
    """Did this error come from the replica dying (or becoming unreachable)?"""
    if isinstance(e, REPLICA_GONE_ERRORS):
        return True
    return isinstance(getattr(e, "cause", None), REPLICA_GONE_ERRORS)  # a RayTaskError


@dataclass
class ReplicaRetry:
    """Start a replica stream, re-issuing it (up to `max_retries` times) while its replica
    dies before the first item. `retries` counts the re-issues (for `router_debug`)."""

    max_retries: int = 2
    retries: int = 0

    def may_reissue(self, e: BaseException, attempt: int, request_id: str, when: str) -> bool:
        """Whether a request whose `attempt`-th try failed with `e` is sent again (its
        replica died and re-issues are left); counts and logs the re-issue."""
        if attempt >= self.max_retries or not replica_gone(e):
            return False
        self.retries += 1
        logger.warning(
            "rayfleet ingress: replica died %s request %s (%s); re-issuing it (%d/%d)",
            when,
            request_id,
            type(e).__name__,
            attempt + 1,
            self.max_retries,
        )
        return True

    async def first_item(self, start: Callable[[], Any], request_id: str = "") -> tuple[Any, Any]:
        """`start()` returns a streaming handle response (an async iterator with `cancel()`).
        Returns (its first item, the stream) from the first attempt that yields one."""
        attempt = 0
        while True:
            stream = start()
            try:
                return await stream.__anext__(), stream
            except BaseException as e:
                stream.cancel()  # a no-op on a stream that already failed
                if not self.may_reissue(e, attempt, request_id, "before a token of"):
                    raise  # a cancelled client, a full queue, ...: never re-issued
                attempt += 1


__all__ = ["REPLICA_GONE_ERRORS", "ReplicaRetry", "replica_gone"]
