"""`rayfleet bench` workloads: exact token lengths from the real tokenizer, the stated
prefix sharing, conversations that resend their history, and user files."""

from __future__ import annotations

import json

import pytest
from rayfleet.loadtests.workloads import (
    Session,
    TokenSource,
    Turn,
    chat_token_ids,
    conversation_messages,
    jsonl_workload,
    load_tokenizer,
    multi_turn_workload,
    random_workload,
    shared_prefix_workload,
)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return load_tokenizer(default_model_dir)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("n", [1, 2, 7, 128, 1000, 3000])
def test_exact_text_round_trips_to_the_exact_token_count(tok, n):
    text, ids = TokenSource(tok, seed=n).exact_text(n)
    assert len(_ids(tok, text)) == n
    assert _ids(tok, text) == ids


def test_fix_up_loop_makes_any_tokens_exact(tok):
    """Arbitrary vocabulary tokens (byte pieces, punctuation) need the re-encode fix-up."""
    src = TokenSource(tok, seed=1)
    src.pool = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    for n in (1, 5, 64, 512):
        text, _ = src.exact_text(n)
        assert len(_ids(tok, text)) == n


def test_exact_text_after_a_prefix_keeps_the_prefix_tokens(tok):
    src = TokenSource(tok, seed=2)
    prefix, prefix_ids = src.exact_text(40)
    suffix, suffix_ids = src.exact_text(25, prefix_text=prefix)
    assert _ids(tok, prefix + suffix) == prefix_ids + suffix_ids
    assert len(suffix_ids) == 25


def test_random_prompts_have_their_drawn_lengths(tok):
    sessions = random_workload(
        TokenSource(tok, seed=0), 40, input_len=100, output_len=20, range_ratio=0.5
    )
    assert len(sessions) == 40
    for s in sessions:
        (turn,) = s.turns
        assert len(tok.encode(turn.prompt)) == turn.prompt_len  # as the server counts
        assert 50 <= turn.prompt_len <= 150
        assert 10 <= turn.output_len <= 30
    assert len({t.prompt_len for s in sessions for t in s.turns}) > 5


def test_random_workload_without_range_ratio_is_fixed_length(tok):
    sessions = random_workload(TokenSource(tok, seed=0), 10, input_len=64, output_len=8)
    assert {len(_ids(tok, s.turns[0].prompt)) for s in sessions} == {64}
    assert {s.turns[0].output_len for s in sessions} == {8}


def test_workloads_are_seeded(tok):
    a = random_workload(TokenSource(tok, seed=5), 5, 32, 8, 0.3)
    b = random_workload(TokenSource(tok, seed=5), 5, 32, 8, 0.3)
    c = random_workload(TokenSource(tok, seed=6), 5, 32, 8, 0.3)
    assert [s.turns[0] for s in a] == [s.turns[0] for s in b]
    assert [s.turns[0].prompt for s in a] != [s.turns[0].prompt for s in c]


def test_random_chat_prompt_length_counts_the_chat_template(tok):
    (s,) = random_workload(TokenSource(tok, seed=0), 1, 30, 8, chat=True)
    msgs = s.turns[0].prompt
    assert len(_ids(tok, msgs[0]["content"])) == 30
    assert s.turns[0].prompt_len == len(chat_token_ids(tok, msgs)) > 30


def test_range_ratio_must_be_below_one(tok):
    with pytest.raises(ValueError, match="range ratio"):
        random_workload(TokenSource(tok, seed=0), 1, 10, 10, range_ratio=1.0)


def test_shared_prefix_groups_share_exactly_their_prefix(tok):
    G, P, prefix_len, suffix_len = 4, 5, 200, 30
    sessions = shared_prefix_workload(
        TokenSource(tok, seed=0), G, P, prefix_len, suffix_len, output_len=8
    )
    assert len(sessions) == G * P
    groups: dict[int, list[list[int]]] = {}
    for s in sessions:
        ids = _ids(tok, s.turns[0].prompt)
        assert len(ids) == prefix_len + suffix_len == s.turns[0].prompt_len
        groups.setdefault(s.group, []).append(ids)
    assert sorted(len(v) for v in groups.values()) == [P] * G
    for members in groups.values():
        assert len({tuple(m[:prefix_len]) for m in members}) == 1  # one prefix per group
        assert len({tuple(m[prefix_len:]) for m in members}) == P  # suffixes of their own
    firsts = [members[0] for members in groups.values()]
    for i in range(G):
        for j in range(i + 1, G):
            assert _common_prefix(firsts[i], firsts[j]) == 0  # groups share nothing


def test_shared_prefix_requests_are_interleaved_across_groups(tok):
    sessions = shared_prefix_workload(TokenSource(tok, seed=0), 4, 8, 16, 4, 4)
    order = [s.group for s in sessions]
    assert order != sorted(order)


def test_shared_prefix_chat_prompts_share_template_head_plus_prefix(tok):
    sessions = shared_prefix_workload(
        TokenSource(tok, seed=0), 2, 2, 50, 10, 4, chat=True, shuffle=False
    )
    ids = [chat_token_ids(tok, s.turns[0].prompt) for s in sessions]
    same_group = _common_prefix(ids[0], ids[1])
    other_group = _common_prefix(ids[0], ids[2])
    assert same_group >= other_group + 50
    assert all(len(x) == s.turns[0].prompt_len for x, s in zip(ids, sessions, strict=True))


def test_multi_turn_conversations_have_exact_user_turns(tok):
    convs = multi_turn_workload(
        TokenSource(tok, seed=0), 3, turns=4, input_len=25, output_len=6, system_prompt_len=12
    )
    assert len(convs) == 3
    for c in convs:
        assert c.multi_turn and len(c.turns) == 4
        first = c.turns[0].prompt
        assert first[0]["role"] == "system"
        assert c.turns[0].prompt_len == len(chat_token_ids(tok, first))
        for t in c.turns:
            assert len(_ids(tok, t.prompt[-1]["content"])) == 25
        assert all(t.prompt_len is None for t in c.turns[1:])  # depends on the replies


def test_every_turn_resends_the_whole_history():
    t1 = Turn([{"role": "user", "content": "a"}], 4)
    t2 = Turn([{"role": "user", "content": "b"}], 4)
    m1 = conversation_messages([], t1)
    history = [*m1, {"role": "assistant", "content": "reply"}]
    m2 = conversation_messages(history, t2)
    assert m2 == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "b"},
    ]


def test_jsonl_accepts_sharegpt_json_arrays(tok, tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": "1",
                    "conversations": [
                        {"from": "human", "value": "What is the capital of France?"},
                        {"from": "gpt", "value": "Paris is the capital of France."},
                    ],
                },
                {
                    "id": "2",
                    "conversations": [
                        {"from": "system", "value": "Be brief."},
                        {"from": "human", "value": "Say hi"},
                        {"from": "gpt", "value": "Hi there!"},
                        {"from": "human", "value": "again"},
                    ],
                },
                {"id": "3", "conversations": [{"from": "gpt", "value": "no human turn"}]},
            ]
        )
    )
    sessions = jsonl_workload(TokenSource(tok, seed=0), str(path), None, chat=True)
    assert len(sessions) == 2  # the record without a human message is skipped
    first, second = (s.turns[0] for s in sessions)
    assert first.prompt == [{"role": "user", "content": "What is the capital of France?"}]
    assert first.output_len == len(_ids(tok, "Paris is the capital of France."))
    assert [m["role"] for m in second.prompt] == ["system", "user"]
    assert second.output_len == len(_ids(tok, "Hi there!"))
    assert first.prompt_len == len(chat_token_ids(tok, first.prompt))


def test_jsonl_accepts_prompts_messages_and_strings(tok, tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "hello there", "output_len": 7},
        {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 3},
        "a plain string",
        {"prompt": "with a completion", "completion": "one two three"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = TokenSource(tok, seed=0)
    sessions = jsonl_workload(src, str(path), None, chat=False)
    turns = [s.turns[0] for s in sessions]
    assert [t.output_len for t in turns] == [7, 3, 128, len(_ids(tok, "one two three"))]
    assert isinstance(turns[1].prompt, str) and "<|im_start|>" in turns[1].prompt  # rendered
    assert turns[0].prompt_len == len(tok.encode("hello there"))
    # --output-len overrides the file; --num-prompts limits it
    limited = jsonl_workload(src, str(path), 2, output_len=5, chat=False)
    assert [s.turns[0].output_len for s in limited] == [5, 5]


def test_jsonl_rejects_unknown_records(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match="unrecognised record"):
        jsonl_workload(TokenSource(tok, seed=0), str(path), None)


def test_session_defaults_to_single_turn():
    s = Session([Turn("x", 1, 1)])
    assert not s.multi_turn and s.group is None
