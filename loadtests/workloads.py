"""Workloads for `rayfleet bench serve`: what is sent, built from real tokenizer tokens.

A workload is a list of `Session`s. A session is one request (random, shared-prefix,
jsonl) or one conversation whose turns run in order, every turn resending the whole
history (multi-turn). Prompt text is built from the tokenizer's own word tokens and
checked by re-encoding, so a prompt of N tokens is N tokens when the server tokenizes it.
Everything is seeded.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = ("random", "shared-prefix", "skewed", "multi-turn", "jsonl")

# A "word token" decodes to one space followed by letters (" house"). A sequence of
# them re-encodes to itself with byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2,
# SmolLM): the pre-tokenizer splits before every space. Other tokenizers fall back to
# the general fix-up loop in `exact_text`.
_WORD_RE = re.compile(r"^ [A-Za-z]{2,}$")
_MIN_WORD_VOCAB = 1000


@dataclass
class Turn:
    """One request: a plain prompt (str) or chat messages, and how many tokens to generate.

    `prompt_len` is the prompt's exact token count as the server will see it (chat:
    after the chat template), or None where it depends on earlier replies.
    """

    prompt: str | list[dict[str, str]]
    output_len: int
    prompt_len: int | None = None


@dataclass
class Session:
    turns: list[Turn]
    multi_turn: bool = False  # True: each turn is sent with the history before it
    group: int | None = None  # shared-prefix group
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- tokenizer


def default_tokenizer_path() -> str:
    """The default model folder (its tokenizer), from the engine's default-model helper."""
    try:
        from rayfleet.engine.default_model import default_model_path
    except ImportError as e:  # pragma: no cover - depends on the engine being present
        raise ValueError(
            "no --tokenizer given and rayfleet.engine.default_model is not available; "
            "pass --tokenizer PATH (a Hugging Face folder with tokenizer files)"
        ) from e
    return str(default_model_path())


def load_tokenizer(path: str | None):
    """AutoTokenizer from a local folder or a .gguf file; never touches a model hub."""
    from transformers import AutoTokenizer

    path = path or default_tokenizer_path()
    p = Path(path)
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    if not p.exists():
        raise ValueError(f"tokenizer path does not exist: {path!r}")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


class TokenSource:
    """Draws real token ids and turns them into text of an exact token length."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = [i for i in range(len(tokenizer)) if i not in special]
        pieces = tokenizer.batch_decode([[i] for i in vocab])
        words = [i for i, s in zip(vocab, pieces, strict=True) if _WORD_RE.match(s)]
        self.word_mode = len(words) >= _MIN_WORD_VOCAB
        self.pool = words if self.word_mode else vocab

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def sample(self, n: int) -> list[int]:
        return [self.rng.choice(self.pool) for _ in range(n)]

    def exact_text(
        self, n: int, prefix_text: str = "", max_tries: int = 50
    ) -> tuple[str, list[int]]:
        """Text that adds exactly `n` tokens after `prefix_text` (whose tokens stay as they are).

        Returns (text, token ids of text as encoded after the prefix). Decode, re-encode,
        then trim or extend and try again until the count is exact (vLLM's random dataset
        does the same fix-up).
        """
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        if n == 0:
            return "", []
        base = self.encode(prefix_text) if prefix_text else []
        ids = self.sample(n)
        for _ in range(max_tries):
            text = self.tok.decode(ids)
            full = self.encode(prefix_text + text)
            got = len(full) - len(base)
            if full[: len(base)] == base and got == n:
                return text, full[len(base) :]
            if full[: len(base)] != base:
                ids = self.sample(n)  # the boundary merged into the prefix: start over
            elif got > n:
                ids = full[len(base) : len(base) + n]
            else:
                ids = full[len(base) :] + self.sample(n - got)
        raise ValueError(f"could not build a text of exactly {n} tokens after {max_tries} tries")

    def count_prompt(self, prompt: str | list[dict[str, str]]) -> int:
        """Tokens the server sees: chat messages through the chat template."""
        if isinstance(prompt, str):
            return len(self.tok.encode(prompt))
        return len(chat_token_ids(self.tok, prompt))


def chat_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer versions
        out = out["input_ids"]
    return list(out)


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """Chat messages as one prompt string (for sending a chat workload to /v1/completions)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {ratio}")
    lo = max(1, int(mean * (1.0 - ratio)))
    hi = max(lo, int(mean * (1.0 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


# ---------------------------------------------------------------- generators


def _single_turn(
    src: TokenSource,
    text: str,
    output_len: int,
    chat: bool,
    group: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Session:
    """One prompt as a one-turn session: the text itself, or one user message for chat."""
    prompt: str | list[dict[str, str]] = [{"role": "user", "content": text}] if chat else text
    return Session(
        [Turn(prompt, output_len, src.count_prompt(prompt))], group=group, meta=meta or {}
    )


def _text_not_starting_with(src: TokenSource, n: int, avoid: set[int]) -> tuple[str, list[int]]:
    """Exactly n tokens of text whose first token is not in `avoid` (a few draws at most),
    so that it shares no cached block with prompts that start with those tokens."""
    for _ in range(100):
        text, ids = src.exact_text(n)
        if not ids or ids[0] not in avoid:
            break
    return text, ids


def random_workload(
    src: TokenSource,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    chat: bool = False,
) -> list[Session]:
    """Independent prompts of random words; lengths uniform in len*(1 -/+ range_ratio)."""
    in_lens = _lengths(src.rng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(src.rng, output_len, range_ratio, num_prompts)
    sessions = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        sessions.append(_single_turn(src, src.exact_text(n_in)[0], n_out, chat))
    return sessions


def shared_prefix_workload(
    src: TokenSource,
    num_groups: int,
    prompts_per_group: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    chat: bool = False,
    shuffle: bool = True,
) -> list[Session]:
    """G groups x P prompts: every prompt of a group starts with the group's `prefix_len`
    tokens, then `suffix_len` tokens of its own. Groups start with different tokens, so
    they share nothing. This is the workload KV-aware routing is for."""
    if num_groups < 1 or prompts_per_group < 1:
        raise ValueError(
            f"need >= 1 group and >= 1 prompt per group, got {num_groups} x {prompts_per_group}"
        )
    sessions = []
    first_tokens: set[int] = set()
    for g in range(num_groups):
        prefix, prefix_ids = _text_not_starting_with(src, prefix_len, first_tokens)
        if prefix_ids:
            first_tokens.add(prefix_ids[0])
        for p in range(prompts_per_group):
            suffix, _ = src.exact_text(suffix_len, prefix_text=prefix)
            sessions.append(
                _single_turn(src, prefix + suffix, output_len, chat, group=g, meta={"index": p})
            )
    if shuffle:
        src.rng.shuffle(sessions)
    return sessions


def skewed_workload(
    src: TokenSource,
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    hot_fraction: float = 0.8,
    chat: bool = False,
    shuffle: bool = True,
) -> list[Session]:
    """One hot prefix: round(hot_fraction x num_prompts) prompts start with the same
    `prefix_len` tokens, then `suffix_len` of their own (group 0, meta hot=True); the rest
    are `prefix_len + suffix_len` tokens of their own that share nothing (group None; their
    first token differs from the hot prefix's). Every prompt has the same length, so the
    two kinds differ only in what is cached. The workload a router must not pile onto the
    replica that caches the hot prefix."""
    if num_prompts < 1:
        raise ValueError(f"need >= 1 prompt, got {num_prompts}")
    if not 0.0 <= hot_fraction <= 1.0:
        raise ValueError(f"hot fraction must be in [0, 1], got {hot_fraction}")
    num_hot = round(hot_fraction * num_prompts)
    hot, hot_ids = src.exact_text(prefix_len)
    first = hot_ids[0] if hot_ids else None
    sessions = []
    for i in range(num_prompts):
        if i < num_hot:
            suffix, _ = src.exact_text(suffix_len, prefix_text=hot)
            text, meta, group = hot + suffix, {"index": i, "hot": True}, 0
        else:
            avoid = {first} if first is not None else set()
            text, _ = _text_not_starting_with(src, prefix_len + suffix_len, avoid)
            meta, group = {"index": i, "hot": False}, None
        sessions.append(_single_turn(src, text, output_len, chat, group=group, meta=meta))
    if shuffle:
        src.rng.shuffle(sessions)
    return sessions


def multi_turn_workload(
    src: TokenSource,
    num_conversations: int,
    turns: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    system_prompt_len: int = 0,
) -> list[Session]:
    """Conversations of `turns` user messages (each exactly its drawn length); every turn
    is sent with all earlier user and assistant messages. Only the first turn's prompt
    length is known before the run: later ones include the server's replies."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    sessions = []
    for c in range(num_conversations):
        system = src.exact_text(system_prompt_len)[0] if system_prompt_len else None
        in_lens = _lengths(src.rng, input_len, range_ratio, turns)
        out_lens = _lengths(src.rng, output_len, range_ratio, turns)
        ts = []
        for k, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True)):
            text, _ = src.exact_text(n_in)
            msgs = [{"role": "user", "content": text}]
            if k == 0 and system:
                msgs.insert(0, {"role": "system", "content": system})
            plen = src.count_prompt(msgs) if k == 0 else None
            ts.append(Turn(msgs, n_out, plen))
        sessions.append(Session(ts, multi_turn=True, meta={"conversation": c}))
    return sessions


def conversation_messages(history: list[dict[str, str]], turn: Turn) -> list[dict[str, str]]:
    """The messages a turn sends: everything said so far, then this turn's new messages."""
    new = (
        turn.prompt if isinstance(turn.prompt, list) else [{"role": "user", "content": turn.prompt}]
    )
    return [*history, *new]


def _read_records(path: str) -> list[Any]:
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(stripped)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


_OUTPUT_LEN_KEYS = ("output_len", "output_tokens", "max_tokens", "max_completion_tokens")


def _record_to_turn(src: TokenSource, rec: Any, output_len: int | None, chat: bool) -> Turn | None:
    """One file record as a Turn, or None if it has no usable prompt.

    Accepted: a string; {"prompt": str, "completion"?: str}; {"messages": [{"role",
    "content"}...]}; ShareGPT's {"conversations": [{"from": "human"|"gpt", "value": str}...]}
    (the first human message and the reply after it). The output length is, first found:
    --output-len; a record's output_len / output_tokens / max_tokens /
    max_completion_tokens; the tokens of its completion or trailing assistant message
    (which is not sent); 128.
    """
    out_len = None
    if isinstance(rec, dict):
        for key in _OUTPUT_LEN_KEYS:
            if rec.get(key) is not None:
                out_len = int(rec[key])
                break
    if isinstance(rec, str):
        prompt: str | list[dict[str, str]] = rec
    elif "prompt" in rec:
        prompt = rec["prompt"]
        if "completion" in rec and out_len is None:
            out_len = len(src.encode(rec["completion"]))
    else:
        if "messages" in rec:
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        elif "conversations" in rec:
            msgs = [
                {"role": _SHAREGPT_ROLES.get(m.get("from", "human"), "user"), "content": m["value"]}
                for m in rec["conversations"]
            ]
            # ShareGPT: the first human message is the prompt, the next reply its length.
            first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            if first_user is None:
                return None
            msgs = msgs[: first_user + 2]
        else:
            raise ValueError(
                f"unrecognised record (no prompt/messages/conversations): {rec!r:.200}"
            )
        if msgs and msgs[-1]["role"] == "assistant":
            if out_len is None:
                out_len = len(src.encode(msgs[-1]["content"]))
            msgs = msgs[:-1]
        if not msgs:
            return None
        prompt = msgs
        if not chat:
            prompt = render_chat(src.tok, msgs)
    if isinstance(prompt, str) and chat:
        prompt = [{"role": "user", "content": prompt}]
    if output_len is not None:
        out_len = output_len
    if out_len is None:
        out_len = 128
    out_len = max(1, out_len)
    return Turn(prompt, out_len, src.count_prompt(prompt))


def jsonl_workload(
    src: TokenSource,
    path: str,
    num_prompts: int | None,
    output_len: int | None = None,
    chat: bool = False,
    shuffle: bool = False,
) -> list[Session]:
    """Prompts or chat messages from a user's JSONL (or JSON array) file; ShareGPT accepted."""
    records = _read_records(path)
    if shuffle:
        src.rng.shuffle(records)
    sessions = []
    for rec in records:
        turn = _record_to_turn(src, rec, output_len, chat)
        if turn is None:
            continue
        sessions.append(Session([turn]))
        if num_prompts and len(sessions) >= num_prompts:
            break
    if not sessions:
        raise ValueError(f"no usable prompts in {path}")
    return sessions


def build_workload(args, tokenizer, chat: bool) -> list[Session]:
    """The workload named by `args.workload`, from the `bench serve` arguments."""
    src = TokenSource(tokenizer, seed=args.seed)
    n = args.num_prompts or 100
    if args.workload == "random":
        return random_workload(src, n, args.input_len, args.output_len, args.range_ratio, chat)
    if args.workload == "shared-prefix":
        return shared_prefix_workload(
            src,
            args.num_groups,
            args.prompts_per_group,
            args.prefix_len,
            args.suffix_len,
            args.output_len,
            chat,
        )
    if args.workload == "skewed":
        return skewed_workload(
            src,
            n,
            args.prefix_len,
            args.suffix_len,
            args.output_len,
            args.hot_fraction,
            chat,
        )
    if args.workload == "multi-turn":
        return multi_turn_workload(
            src,
            n,
            args.turns,
            args.input_len,
            args.output_len,
            args.range_ratio,
            args.system_prompt_len,
        )
    if args.workload == "jsonl":
        if not args.dataset_path:
            raise ValueError("--workload jsonl needs --dataset-path FILE")
        out = args.output_len if args.output_len_set else None
        return jsonl_workload(src, args.dataset_path, args.num_prompts, out, chat, args.shuffle)
    raise ValueError(f"unknown workload {args.workload!r}; choose one of {WORKLOADS}")
