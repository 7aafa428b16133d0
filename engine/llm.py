"""LLM: the offline API users of vLLM recognise (`LLM(...).generate(prompts, params)`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .config import EngineConfig
from .llm_engine import LLMEngine, PromptType
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import apply_chat_template


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta RequestOutput into an accumulated one (creating it on first use)."""
    if acc is None:
        acc = RequestOutput(
            request_id=delta.request_id,
            prompt=delta.prompt,
            prompt_token_ids=delta.prompt_token_ids,
            outputs=[],
            finished=False,
        )
    by_index = {o.index: o for o in acc.outputs}
    for d in delta.outputs:
        o = by_index.get(d.index)
        if o is None:
            o = CompletionOutput(
                index=d.index,
                text="",
                token_ids=[],
                logprobs=[] if d.logprobs is not None else None,
            )
            by_index[d.index] = o
            acc.outputs.append(o)
        o.text += d.text
        o.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            if o.logprobs is None:
                o.logprobs = []
            o.logprobs.extend(d.logprobs)
        o.cumulative_logprob = d.cumulative_logprob
        if d.finish_reason is not None:
            o.finish_reason = d.finish_reason
            o.stop_reason = d.stop_reason
    acc.outputs.sort(key=lambda o: o.index)
    acc.finished = delta.finished
    acc.metrics = delta.metrics or acc.metrics
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.error = delta.error
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc


class LLM:
    """Offline batched generation. Keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt under continuous batching; one RequestOutput each, in order.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}. All prompts
        are validated before any is queued: one bad prompt raises and queues nothing.
        """
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        prepared = [
            self.engine.prepare_request(f"offline-{next(self._ids)}", p, sp)
            for p, sp in zip(prompts, params, strict=True)
        ]
        for p in prepared:
            self.engine.add_prepared(p)
        results: dict[str, RequestOutput] = {}
        pending = {p.request_id for p in prepared}
        while pending:
            for delta in self.engine.step():
                results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
                if delta.finished:
                    pending.discard(delta.request_id)
        return [results[p.request_id] for p in prepared]

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": apply_chat_template(
                    self.tokenizer, conv, add_generation_prompt=add_generation_prompt
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)
