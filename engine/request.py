"""Request: one sequence the engine is generating (one sample of a user's request).

A user's request with `n` > 1 becomes n Requests ("siblings") that share the prompt; the
engine gathers their outputs back into one RequestOutput. There is no prefill or decode
phase: a request simply has `num_computed_tokens` catching up with `num_tokens`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted with recompute)
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted, its blocks copied to CPU memory
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    request_id: str  # unique per sample: "<parent id>" for n == 1, "<parent id>#<i>" otherwise
    parent_id: str
    sample_index: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # resolved: never runs past the context length
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # The leading tokens served from the prefix cache when it was (last) scheduled.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Per-request RNG: a seeded request samples the same tokens whatever else is batched.
    generator: torch.Generator | None = None
    # Chained hashes of this request's full blocks, extended as tokens are generated.
    block_hashes: list[int] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Prompt logprobs (sample 0 of a request that asked for them): entry i is for prompt
    # token i (None for the first, which nothing predicts), filled as prefill chunks run.
    prompt_logprobs: list | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Still computing its prompt logprobs: every prompt position must run through the
        model, so the prefix cache is not used for it until they are complete."""
        pl = self.prompt_logprobs
        return pl is not None and len(pl) < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
