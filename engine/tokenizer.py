"""Tokenizer loading and chat templates: a thin layer over `transformers`, local files only.

`load_tokenizer` reads a Hugging Face model folder (tokenizer.json / tokenizer_config.json /
chat template) or a GGUF file (the tokenizer and chat template are inside it); it never
contacts a model hub. `eos_token_ids` merges the tokenizer's EOS with generation_config.json's
`eos_token_id` (an int or a list), which is how Llama 3 / Qwen2 chat models stop on both
<|eot_id|> and <|end_of_text|>.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def load_tokenizer(path: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local model: a folder, a `.gguf` file, or a folder holding one.

    Raises ValueError when `path` does not exist (it is never taken for a hub repo id).
    Extra keyword arguments go to `AutoTokenizer.from_pretrained`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"tokenizer path does not exist: {path!r} (a local folder or .gguf file)")
    kwargs.setdefault("local_files_only", True)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"tokenizer path must be a folder or a .gguf file, got {path!r}")
        return AutoTokenizer.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path), **kwargs
        )
    has_tokenizer_files = any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    if not has_tokenizer_files:
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return AutoTokenizer.from_pretrained(path, gguf_file=ggufs[0], **kwargs)
        if len(ggufs) > 1:
            raise ValueError(
                f"{path!r} has no tokenizer files and several .gguf files {ggufs}: "
                "pass the .gguf file's path"
            )
        raise ValueError(
            f"no tokenizer in {path!r}: expected one of {list(_TOKENIZER_FILES)} or a .gguf file"
        )
    return AutoTokenizer.from_pretrained(path, **kwargs)


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, kw: Mapping[str, Any]) -> None:
    if kw.get("chat_template") is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template: use a chat/instruct model, pass "
            "chat_template=..., or send a plain completion prompt instead of messages"
        )


def apply_chat_template_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    **kw: Any,
) -> str:
    """Render `messages` with the tokenizer's chat template (or `chat_template=`) to text."""
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError(f"messages must be a list of dicts, got {messages!r}")
    _check_chat_template(tokenizer, kw)
    kw.pop("tokenize", None)
    kw.pop("return_dict", None)
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kw
    )
    if not isinstance(text, str):  # pragma: no cover - defensive against API drift
        raise ValueError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    **kw: Any,
) -> list[int]:
    """Render `messages` with the chat template and tokenize it.

    The template writes its own special tokens (BOS and the like), so the text is tokenized
    with add_special_tokens=False, as transformers' own apply_chat_template(tokenize=True) does.
    """
    text = apply_chat_template_text(tokenizer, messages, add_generation_prompt, **kw)
    return tokenizer.encode(text, add_special_tokens=False)


def _read_generation_config(source: str | os.PathLike | Mapping | None) -> Mapping:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf")):
        # A model folder, or a GGUF file (its EOS is in the tokenizer already): read the
        # generation_config.json beside it, if there is one.
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        path = os.path.join(folder, "generation_config.json")
        if not os.path.exists(path):
            return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"generation config not found: {path!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"generation config {path!r} is not valid JSON: {e}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"generation config {path!r} must be a JSON object, got {config!r}")
    return config


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    generation_config: str | os.PathLike | Mapping | None = None,
) -> frozenset[int]:
    """The ids that end generation: the tokenizer's EOS plus generation_config's eos_token_id.

    `generation_config` is a generation_config.json path, the model folder (or .gguf file)
    beside it, or the parsed dict; None for the tokenizer's EOS alone.
    """
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    value = _read_generation_config(generation_config).get("eos_token_id")
    if value is None:
        pass
    elif isinstance(value, bool):
        raise ValueError(f"generation config eos_token_id must be an int or list, got {value!r}")
    elif isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        ids.update(value)
    else:
        raise ValueError(
            f"generation config eos_token_id must be an int or list of ints, got {value!r}"
        )
    return frozenset(ids)
