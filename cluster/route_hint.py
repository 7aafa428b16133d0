"""RouteHint: the prompt facts the ingress hands the request router with each request.

Its own module, not `kv_router`'s: Ray Serve ships the request-router class to every caller
by pickling `kv_router` *by value* (`RequestRouterConfig` registers the router's module with
`cloudpickle.register_pickle_by_value`), so every class defined there is a fresh copy in the
caller's process and `isinstance` against the ingress's instances fails. Classes imported
from other modules travel by reference: the router and the ingress share this one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RouteHint:
    """What the router needs to know about a request (sent by the ingress, ignored by
    the replica): the chained block hashes of its whole prompt, its length and priority."""

    block_hashes: tuple[int, ...]
    num_prompt_tokens: int
    priority: int = 0


__all__ = ["RouteHint"]
