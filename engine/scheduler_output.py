"""SchedulerOutput: what the scheduler decided for one engine step, handed to the ModelRunner."""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens starting at
    `request.num_computed_tokens`, writing their KV into `block_ids` (its whole block table)."""

    request: Request
    num_new_tokens: int
    block_ids: list[int]
    # Fixed when scheduled (the engine advances num_computed_tokens after the step):
    # the first position computed, and whether this chunk reaches the request's last known
    # token, so that a token is sampled from its logits.
    start_pos: int = field(init=False)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.start_pos = self.request.num_computed_tokens
        self.samples = self.start_pos + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # (device block id, cpu block id) pairs. The runner copies them before the step's forward,
    # swap-outs first: a swapped-out device block may be reused by this very step.
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    # Requests preempted or finished/aborted since the last step (runners may drop state).
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
