"""IncrementalDetokenizer: a request's output token ids -> streamed text deltas, with stop strings.

Decoding (vLLM / HF TextStreamer): keep two offsets into the output ids. `prefix_offset`
starts a small window whose decode is already emitted, `read_offset` ends it. Each update
decodes ids[prefix_offset:] and emits what extends past decode(ids[prefix_offset:read_offset]),
unless it ends in U+FFFD: then a multi-byte character is still split over tokens and nothing
moves until the next token completes it. Decoding a window (never a lone token) keeps
context-dependent decoders (SentencePiece's leading space, byte fallback) right, and each
step costs O(window), not O(output).

Stop strings: the decoded text is searched for every stop string (only where a new match
could be, and not before the output has min_tokens tokens); on a hit the text is cut before
it (or after it, include_stop_str_in_output) and the request is done. Trailing characters that could still grow into a stop string are
held back until the next tokens decide, so a stop string never leaks out in part.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerUpdate:
    text_delta: str  # new output text, ready to stream
    stop_str: str | None = None  # the stop string that ended the output, if one did


def _decode_kwargs(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool, spaces_between: bool
) -> dict[str, Any]:
    kw: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
    # Only slow (SentencePiece / Python) tokenizers know spaces_between_special_tokens.
    try:
        params = inspect.signature(type(tokenizer)._decode).parameters
    except (AttributeError, TypeError, ValueError):
        params = {}
    if "spaces_between_special_tokens" in params:
        kw["spaces_between_special_tokens"] = spaces_between
    return kw


class IncrementalDetokenizer:
    """Streams one request's output text; feed it every new token id with `update`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer
        # The prompt is kept for callers (echo, logging); the output text is decoded from
        # the output ids alone, like tokenizer.decode(output_ids) and HF's TextStreamer.
        self.prompt_token_ids = list(prompt_token_ids)
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # vLLM: stop strings count only once the output has min_tokens tokens; a match that
        # ends in text decoded before then is ignored.
        self.min_tokens = min_tokens
        self._decode_kw = _decode_kwargs(
            tokenizer, skip_special_tokens, spaces_between_special_tokens
        )
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # decoded so far (cut at the stop string once one is hit)
        self._emitted = 0  # how much of _text has been handed out
        self._searched = 0  # no stop string ends at or before this position of _text
        self.stop_str: str | None = None
        self.finished = False

    # ------------------------------------------------------------------ public

    @property
    def output_text(self) -> str:
        """All the text emitted so far (the concatenation of every delta)."""
        return self._text[: self._emitted]

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; later tokens are ignored."""
        return self.stop_str is not None

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Take the request's new token ids; return the text now safe to stream."""
        if self.finished or self.stopped:
            return DetokenizerUpdate("", None)
        self.token_ids.extend(new_token_ids)
        self._text += self._decode_new()
        stop_str = self._check_stop()
        if stop_str is not None:
            return DetokenizerUpdate(self._take(len(self._text)), stop_str)
        return DetokenizerUpdate(self._take(len(self._text) - self._holdback()), None)

    def finish(self) -> str:
        """Flush what was held back (an unfinished character, a stop-string prefix).

        After finish(), output_text == tokenizer.decode(token_ids, skip_special_tokens=...)
        unless a stop string cut it.
        """
        if self.finished:
            return ""
        self.finished = True
        if not self.stopped:
            full = self.tokenizer.decode(self.token_ids, **self._decode_kw)
            if full.startswith(self._text):
                self._text = full
            else:  # a decoder whose window decode differs from the whole: keep going as is
                self._text += self._decode_window(final=True)
            self._check_stop()
        return self._take(len(self._text))

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, **self._decode_kw) if ids else ""

    def _decode_window(self, final: bool) -> str:
        ids = self.token_ids
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            # Nothing new yet, or a character still split over tokens: wait for more.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return new_text[len(prefix_text) :]

    def _decode_new(self) -> str:
        return self._decode_window(final=False)

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _check_stop(self) -> str | None:
        """Find the stop string that completes first in the new text; cut the text there."""
        if not self.stop or self.stopped:
            return None
        text = self._text
        if len(self.token_ids) < self.min_tokens:
            self._searched = len(text)
            return None
        # A new match ends after _searched, so it starts at most max_stop_len - 1 before it.
        searched = self._searched
        start = max(0, searched - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop:
            i = text.find(s, start)
            while i != -1 and i + len(s) <= searched:  # old (before min_tokens): not counted
                i = text.find(s, i + 1)
            if i != -1:
                cand = (i + len(s), i, s)
                if best is None or cand < best:
                    best = cand
        self._searched = len(text)
        if best is None:
            return None
        end, begin, s = best
        self._text = text[:end] if self.include_stop_str_in_output else text[:begin]
        self.stop_str = s
        return s

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        if not self.stop:
            return 0
        text = self._text
        for n in range(min(self._max_stop_len - 1, len(text) - self._emitted), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


def decode_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token's text for logprobs' decoded_token (special tokens kept, spaces kept).

    A byte-level token holding part of a multi-byte character decodes to U+FFFD, as in vLLM.
    SentencePiece strips the leading space of a lone token ("▁Hello" -> "Hello"); it is put
    back, since the token does carry it.
    """
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if not text.startswith(" "):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece.startswith("\u2581"):
            text = " " + text
    return text
