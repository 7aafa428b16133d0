"""The packed-or-BLAS row tables measured at load (`engine/cpu_linear_tuning.py`)."""

from __future__ import annotations

import pytest
from rayfleet.engine import EngineConfig
from rayfleet.engine.cpu_linear_tuning import (
    BUCKETS,
    LM_HEAD_BUCKETS,
    BucketTiming,
    describe,
    table_from_timings,
)
from rayfleet.engine.model_runner import ModelRunner
from rayfleet.engine.models.embedding import ParallelLMHead
from rayfleet.engine.models.linear import (
    PACKED_ROWS_LAYER,
    PACKED_ROWS_LM_HEAD,
    _ParallelLinearBase,
    rows_between,
)


def _timings(packed_wins: dict[int, bool]) -> list[BucketTiming]:
    return [BucketTiming(r, 1.0, 0.5 if win else 1.0) for r, win in packed_wins.items()]


def test_a_row_count_follows_the_next_bucket_up_and_the_last_bucket_past_the_end():
    table = table_from_timings(_timings({1: True, 2: True, 4: True, 8: False, 16: True}))
    assert len(table) == 17 and not table[0]
    assert [n for n in range(1, 17) if table[n]] == [1, 2, 3, 4, *range(9, 17)]
    assert table[-1]  # `cpu_linear` sends rows past the end where the last bucket went


def test_packed_needs_a_margin_to_win_a_bucket():
    close = [BucketTiming(1, 1.0, 0.99), BucketTiming(2, 1.0, 0.9)]
    assert table_from_timings(close) == (False, False, True)
    assert table_from_timings([]) == ()


def test_fixed_tables_stop_at_their_range():
    t = rows_between(8, 33)
    assert [n for n in range(len(t)) if t[n]] == list(range(8, 33)) and not t[-1]


@pytest.mark.parametrize("mode", ["measure", "fixed"])
def test_the_runner_measures_and_applies_the_tables(tiny_model_factory, mode):
    path = tiny_model_factory()
    runner = ModelRunner(
        EngineConfig(model=str(path), block_size=4, device="cpu", cpu_packed_rows=mode),
        str(path),
    )
    layers = [m for m in runner.model.modules() if isinstance(m, _ParallelLinearBase)]
    heads = [m for m in runner.model.modules() if isinstance(m, ParallelLMHead)]
    choice = runner.packed_rows_choice
    if mode == "fixed":
        assert choice is None
        assert all(m.packed_rows == PACKED_ROWS_LAYER for m in layers)
        assert all(m.packed_rows == PACKED_ROWS_LM_HEAD for m in heads)
        return
    assert [t.rows for t in choice.layer_timings] == list(BUCKETS)
    assert [t.rows for t in choice.lm_head_timings] == list(LM_HEAD_BUCKETS)
    assert all(t.blas_s > 0 and t.packed_s > 0 for t in choice.layer_timings)
    assert len(choice.layers) == BUCKETS[-1] + 1 and len(choice.lm_head) == LM_HEAD_BUCKETS[-1] + 1
    assert all(m.packed_rows is choice.layers for m in layers)
    assert all(m.packed_rows is choice.lm_head for m in heads)
    assert "layers 1:" in describe(choice) and "lm_head 1:" in describe(choice)


def test_no_packed_copies_means_nothing_to_measure(tiny_model_factory):
    path = tiny_model_factory()
    cfg = EngineConfig(model=str(path), block_size=4, device="cpu", cpu_packed_weights="none")
    assert ModelRunner(cfg, str(path)).packed_rows_choice is None
