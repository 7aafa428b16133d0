"""Output processing: sampled tokens -> stop checks, incremental text, per-request deltas.

One RequestState per user request gathers its n samples. Each engine step turns the
tokens sampled for it into a delta RequestOutput (only what is new since the last one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, decode_token
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import Request, RequestStatus
from .sampler import TokenLogprobs


@dataclass
class SampleState:
    request: Request
    detokenizer: IncrementalDetokenizer
    cumulative_logprob: float = 0.0
    # Pending delta since the last output
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reported: bool = False


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    arrival_time: float
    error: str | None = None
    prompt_logprobs_reported: bool = False

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.states: dict[str, RequestState] = {}  # parent request id -> state

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state

    def make_detokenizer(self, request: Request) -> IncrementalDetokenizer:
        p = request.sampling_params
        return IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
            stop=p.stop,
            include_stop_str_in_output=p.include_stop_str_in_output,
            min_tokens=p.min_tokens,
        )

    def logprob_entry(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        """{token: Logprob} for one position: the token itself, then the top-k by rank."""
        entry = {
            lp.token_id: Logprob(lp.logprob, lp.rank, decode_token(self.tokenizer, lp.token_id))
        }
        for rank, (tid, val) in enumerate(lp.top, start=1):
            if tid not in entry:
                entry[tid] = Logprob(val, rank, decode_token(self.tokenizer, tid))
        return entry

    def add_prompt_logprobs(self, req: Request, first: int, lps: list[TokenLogprobs]) -> None:
        """Prompt tokens `first`, `first + 1`, ... scored by a step (positions already held,
        from a recompute after preemption, are skipped)."""
        have = req.prompt_logprobs
        for t, lp in enumerate(lps, start=first):
            if t == len(have):
                have.append(self.logprob_entry(lp))

    def process_token(
        self, sample: SampleState, token_id: int, logprobs: TokenLogprobs | None
    ) -> RequestStatus | None:
        """Append a sampled token; return the finishing status if the request must stop."""
        req = sample.request
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        req.append_output_token(token_id)
        sample.new_token_ids.append(token_id)
        if logprobs is not None:
            sample.cumulative_logprob += logprobs.logprob
            sample.new_logprobs.append(self.logprob_entry(logprobs))

        params = req.sampling_params
        past_min = req.num_output_tokens >= params.min_tokens
        update = sample.detokenizer.update([token_id])
        sample.new_text += update.text_delta
        if past_min:
            if token_id in req.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if update.stop_str is not None:
                req.stop_reason = update.stop_str
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def on_finished(self, sample: SampleState) -> None:
        """Flush text held back for a possible stop string (unless a stop string ended it)."""
        if sample.request.stop_reason is None or isinstance(sample.request.stop_reason, int):
            sample.new_text += sample.detokenizer.finish()

    def make_delta(self, state: RequestState) -> RequestOutput | None:
        """The request's delta since the last call, or None if nothing changed."""
        outputs = []
        for i, s in enumerate(state.samples):
            finished = s.request.is_finished and not s.finish_reported
            if not (s.new_token_ids or s.new_text or finished):
                continue
            req = s.request
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=s.new_text,
                    token_ids=s.new_token_ids,
                    cumulative_logprob=s.cumulative_logprob
                    if req.sampling_params.logprobs is not None
                    else None,
                    logprobs=s.new_logprobs if req.sampling_params.logprobs is not None else None,
                    finish_reason=req.status.value if finished else None,
                    stop_reason=req.stop_reason if finished else None,
                )
            )
            s.new_token_ids, s.new_text, s.new_logprobs = [], "", []
            if finished:
                s.finish_reported = True
        if not outputs:
            return None
        prompt_logprobs = None
        first_req = state.samples[0].request
        if (
            not state.prompt_logprobs_reported
            and first_req.prompt_logprobs is not None
            and not first_req.needs_prompt_logprobs
        ):
            prompt_logprobs = first_req.prompt_logprobs
            state.prompt_logprobs_reported = True
        done = state.finished
        metrics = None
        if done:
            first = state.samples[0].request
            metrics = RequestMetrics(
                arrival_time=state.arrival_time,
                first_scheduled_time=min(
                    (
                        s.request.first_scheduled_time
                        for s in state.samples
                        if s.request.first_scheduled_time
                    ),
                    default=None,
                ),
                first_token_time=min(
                    (
                        s.request.first_token_time
                        for s in state.samples
                        if s.request.first_token_time
                    ),
                    default=None,
                ),
                last_token_time=max(
                    (s.request.last_token_time or 0.0 for s in state.samples), default=None
                ),
                finished_time=time.monotonic(),
                num_preemptions=sum(s.request.num_preemptions for s in state.samples),
                num_cached_tokens=first.num_cached_tokens,
            )
            del self.states[state.request_id]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=done,
            metrics=metrics,
            num_cached_tokens=state.samples[0].request.num_cached_tokens,
            error=state.error,
            prompt_logprobs=prompt_logprobs,
        )
