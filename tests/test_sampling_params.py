"""SamplingParams: defaults, normalisation, and ValueErrors that name the field and the value."""

from __future__ import annotations

import math

import pytest
from rayfleet.engine.sampling_params import GREEDY_EPS, SamplingParams

INVALID = [
    ("n", 0),
    ("n", -3),
    ("temperature", -0.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", math.nan),
    ("top_k", -2),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("presence_penalty", 2.5),
    ("presence_penalty", -3.0),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("logprobs", 21),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=lambda v: repr(v))
def test_invalid_value_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert field in message
    assert repr(value) in message or str(value) in message


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ValueError, match=r"min_tokens \(5\).*max_tokens \(3\)"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["ok", ""])


def test_defaults_are_valid_and_sample():
    params = SamplingParams()
    assert params.n == 1 and params.temperature == 1.0 and params.max_tokens == 16
    assert not params.greedy
    assert params.stop == [] and params.stop_token_ids == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(presence_penalty=-2.0, frequency_penalty=2.0),
        dict(max_tokens=None),
        dict(max_tokens=1, min_tokens=1),
        dict(logprobs=0),
        dict(logprobs=20),
        dict(temperature=0.0),
        dict(top_k=1),
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []


def test_top_k_zero_means_disabled():
    assert SamplingParams(top_k=0).top_k == -1


def test_greedy_below_the_threshold():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=GREEDY_EPS / 2).greedy
    assert not SamplingParams(temperature=GREEDY_EPS).greedy


def test_validate_catches_fields_changed_after_construction():
    params = SamplingParams()
    params.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        params.validate()


# NaN temperature would make every probability NaN in the sampler.
@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", math.nan), ("temperature", math.inf), ("repetition_penalty", math.nan)],
)
def test_non_finite_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", True), ("top_k", 2.5), ("max_tokens", 2.5), ("stop", [1]), ("stop_token_ids", [-1])],
)
def test_wrongly_typed_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
