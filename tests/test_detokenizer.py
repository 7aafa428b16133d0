"""IncrementalDetokenizer (and the tokenizer helpers it sits on), with the default model's tokenizer.

The streamed deltas must add up to tokenizer.decode(output ids); a character split over
tokens never comes out as U+FFFD; a stop string cuts the text and never leaks out in part.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rayfleet.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer, decode_token
from rayfleet.engine.tokenizer import (
    apply_chat_template,
    apply_chat_template_text,
    eos_token_ids,
    load_tokenizer,
)

FFFD = "\ufffd"

# Text that stresses byte-level BPE: accents, CJK, emoji (4-byte, ZWJ sequences, skin
# tones, flags), combining marks, whitespace runs and ASCII.
ALPHABET = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from(list("éüñßøå日本語中文한국어ありがとうДобрый∑∫√€£¥–—…\n\t  ")),
    st.sampled_from(["😀", "🚀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "e\u0301", "🙂", "\u200b"]),
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
)
TEXTS = st.lists(ALPHABET, min_size=1, max_size=40).map("".join)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """Cut ids at the given positions (taken modulo len(ids) + 1, sorted)."""
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(points, points[1:], strict=False)]


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str | None]:
    deltas, stop_str = [], None
    for chunk in chunks:
        update = detok.update(chunk)
        assert isinstance(update, DetokenizerUpdate)
        deltas.append(update.text_delta)
        if update.stop_str is not None:
            stop_str = update.stop_str
            break
    deltas.append(detok.finish())
    return deltas, stop_str


# ------------------------------------------------------------------ plain streaming


@SETTINGS
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_deltas_add_up_to_the_full_decode(tokenizer, text, cuts):
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[1, 2, 3])
    deltas, stop_str = stream(detok, split(ids, cuts))
    assert stop_str is None
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.output_text == "".join(deltas)


@SETTINGS
@given(text=TEXTS)
def test_token_by_token_never_emits_a_split_character(tokenizer, text):
    ids = encode(tokenizer, text)
    # Byte-level vocabularies may lack a few byte tokens (SmolLM2 has no 0xF1..0xF3), so
    # some code points do not survive encoding: those decode to U+FFFD on their own.
    assume(FFFD not in tokenizer.decode(ids))
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[])
    deltas, _ = stream(detok, [[i] for i in ids])
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(
    data=st.data(),
    skip_special_tokens=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=20),
)
def test_random_token_ids_add_up_to_the_full_decode(tokenizer, data, skip_special_tokens, cuts):
    # Arbitrary ids: lone byte fragments, special tokens, invalid UTF-8 runs.
    special = sorted(tokenizer.all_special_ids)
    ids = data.draw(
        st.lists(
            st.one_of(st.integers(0, len(tokenizer) - 1), st.sampled_from(special)),
            max_size=40,
        )
    )
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip_special_tokens)
    deltas, _ = stream(detok, split(ids, cuts))
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_emoji_split_over_tokens_comes_out_whole(tokenizer):
    ids = encode(tokenizer, "ok 😀")
    assert len(ids) > 2, "the emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.update([i]).text_delta for i in ids]
    assert deltas[-1].endswith("😀")
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == "ok 😀"
    assert detok.finish() == ""


def test_incomplete_character_at_the_end_is_flushed_by_finish(tokenizer):
    ids = encode(tokenizer, "a 😀")[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detok.update([i]).text_delta for i in ids)
    assert FFFD not in streamed
    assert streamed + detok.finish() == tokenizer.decode(ids)


def test_special_tokens_kept_when_not_skipped(tokenizer):
    eos = tokenizer.eos_token
    ids = encode(tokenizer, "hi") + [tokenizer.eos_token_id] + encode(tokenizer, " there")
    kept = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    assert "".join(stream(kept, [[i] for i in ids])[0]) == f"hi{eos} there"
    assert "".join(stream(skipped, [[i] for i in ids])[0]) == "hi there"


@pytest.fixture(scope="module")
def llama_style_tokenizer():
    """A tiny SentencePiece-style tokenizer (Llama 2 / Mistral decoders): Metaspace, byte
    fallback for unseen characters, and the first token's leading space stripped."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    corpus = ["hello world, this is a test", "the quick brown fox jumps over the lazy dog"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte-fallback tokens live in the model's vocab, as in Llama's
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@SETTINGS
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_llama_style_byte_fallback_deltas_add_up(llama_style_tokenizer, text, cuts):
    tok = llama_style_tokenizer
    ids = encode(tok, text)
    full = tok.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tok, [])
    deltas, _ = stream(detok, split(ids, cuts))
    assert "".join(deltas) == full
    if FFFD not in full:
        assert all(FFFD not in d for d in deltas[:-1])


# ------------------------------------------------------------------ stop strings


@SETTINGS
@given(
    data=st.data(),
    text=TEXTS,
    include=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=30),
)
def test_stop_string_is_cut_at_every_split_point(tokenizer, data, text, include, cuts):
    full = tokenizer.decode(encode(tokenizer, text))
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : start + data.draw(st.integers(1, 6))]
    ids = encode(tokenizer, text)
    first = full.find(stop)
    expected = full[: first + len(stop)] if include else full[:first]

    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
    emitted, stop_str = "", None
    for chunk in split(ids, cuts):
        update = detok.update(chunk)
        emitted += update.text_delta
        # Never ahead of the cut: nothing past it (no part of the stop string) leaks out.
        assert expected.startswith(emitted), (emitted, expected)
        if update.stop_str is not None:
            stop_str = update.stop_str
            break
    emitted += detok.finish()
    # Usually an update reports it; a stop string inside text held back to the very end
    # (say U+FFFD from bytes that never formed a character) is found by finish().
    assert stop_str in (stop, None)
    assert detok.stop_str == stop
    assert emitted == expected
    assert detok.output_text == expected


@pytest.mark.parametrize("split_at", range(12))
def test_stop_string_spanning_tokens_never_leaks(tokenizer, split_at):
    text = "Answer: 42 THE END, and more text"
    ids = encode(tokenizer, text)
    chunks = [ids[:split_at], ids[split_at:]] if split_at < len(ids) else [ids]
    detok = IncrementalDetokenizer(tokenizer, [], stop=["THE END"])
    seen = []
    for chunk in chunks:
        update = detok.update(chunk)
        seen.append(update.text_delta)
        assert "THE END"[:2] not in "".join(seen)[len("Answer: 42 ") - 1 :]
        if update.stop_str:
            break
    assert update.stop_str == "THE END"
    assert "".join(seen) + detok.finish() == "Answer: 42 "


def test_held_back_stop_prefix_is_released_when_the_match_fails(tokenizer):
    ids = encode(tokenizer, "the END")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["ENDING"])
    out = "".join(detok.update([i]).text_delta for i in ids)
    assert out == "the "  # "END" could still become "ENDING"
    assert detok.finish() == "END"
    assert detok.output_text == "the END"


def test_the_stop_string_that_completes_first_wins(tokenizer):
    ids = encode(tokenizer, "one two three four")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["three four", "two"])
    deltas, stop_str = stream(detok, [ids])
    assert stop_str == "two"
    assert "".join(deltas) == "one "


def test_include_stop_str_in_output(tokenizer):
    ids = encode(tokenizer, "hello world, bye")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world"], include_stop_str_in_output=True)
    deltas, stop_str = stream(detok, [[i] for i in ids])
    assert stop_str == "world"
    assert "".join(deltas) == "hello world"


def test_updates_after_a_stop_are_ignored(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["b"])
    assert detok.update(encode(tokenizer, "a b")) == DetokenizerUpdate("a ", "b")
    assert detok.update(encode(tokenizer, " more")) == DetokenizerUpdate("", None)
    assert detok.finish() == ""
    assert detok.output_text == "a "


def test_stop_strings_before_min_tokens_do_not_count(tokenizer):
    ids = encode(tokenizer, "a b c b d")
    assert len(ids) == 5
    detok = IncrementalDetokenizer(tokenizer, [], stop=["b"], min_tokens=3)
    deltas, stop_str = stream(detok, [[i] for i in ids])
    # The first " b" (output token 2) is too early; the second (token 4) stops.
    assert stop_str == "b"
    assert "".join(deltas) == "a b c "


def test_a_stop_string_completed_before_min_tokens_is_not_found_later(tokenizer):
    ids = encode(tokenizer, "a b c")
    assert len(ids) == 3
    # The long stop string makes the search look back over " b", which ended too early.
    stop = ["b", "a much longer stop string"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop, min_tokens=3)
    deltas, stop_str = stream(detok, [[i] for i in ids])
    assert stop_str is None
    assert "".join(deltas) == "a b c"


def test_empty_stop_string_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tokenizer, [], stop=[""])


# ------------------------------------------------------------------ decode_token


def test_decode_token(tokenizer):
    ids = encode(tokenizer, "Hello world")
    assert "".join(decode_token(tokenizer, i) for i in ids) == "Hello world"
    assert decode_token(tokenizer, tokenizer.eos_token_id) == tokenizer.eos_token


# ------------------------------------------------------------------ tokenizer helpers


def test_load_tokenizer_rejects_a_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_rejects_a_folder_without_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_chat_template_ids_match_the_rendered_text(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    text = apply_chat_template_text(tokenizer, messages)
    ids = apply_chat_template(tokenizer, messages)
    assert "What is 2 + 2?" in text
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    without = apply_chat_template_text(tokenizer, messages, add_generation_prompt=False)
    assert text.startswith(without) and len(text) > len(without)


def test_chat_template_missing_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])


def test_eos_token_ids_merge_tokenizer_and_generation_config(tokenizer, tmp_path):
    own = tokenizer.eos_token_id
    assert eos_token_ids(tokenizer) == frozenset({own})
    assert eos_token_ids(tokenizer, {"eos_token_id": 7}) == frozenset({own, 7})
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": [7, 8, own]}))
    assert eos_token_ids(tokenizer, path) == frozenset({own, 7, 8})
    assert eos_token_ids(tokenizer, tmp_path) == frozenset({own, 7, 8})  # the model folder
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00")  # a GGUF path: the generation config beside it
    assert eos_token_ids(tokenizer, gguf) == frozenset({own, 7, 8})
    (tmp_path / "bare").mkdir()  # a model folder without a generation config
    assert eos_token_ids(tokenizer, tmp_path / "bare") == frozenset({own})
    with pytest.raises(ValueError, match="not found"):
        eos_token_ids(tokenizer, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="eos_token_id"):
        eos_token_ids(tokenizer, {"eos_token_id": "2"})
