"""SamplingParams: normalisation, one clear ValueError per bad field, hostile input, from_dict."""

import dataclasses
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loong_jax.sampling.params import (MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                                       SamplingParams)


def test_defaults_and_normalisation():
    params = SamplingParams(temperature=1, top_k=-1, stop="###", stop_token_ids=[7, 7, 3], seed=5)
    assert params.temperature == 1.0 and isinstance(params.temperature, float)
    assert params.top_k == 0  # -1 and 0 both mean "off"
    assert params.stop == ("###",)
    assert params.stop_token_ids == (7, 3)
    assert not params.greedy and not params.uses_penalties
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    assert params.all_stop_token_ids((2,)) == (7, 3, 2)
    assert SamplingParams(ignore_eos=True, stop_token_ids=[4]).all_stop_token_ids((2,)) == (4,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 2.0


def test_temperature_defaults_to_vllms_and_the_cli_says_it_differs():
    """The Python API samples by default (vLLM's 1.0); the commands are greedy by default and say so."""
    import argparse

    from loong_jax.entrypoints.cli import add_sampling_arguments

    assert SamplingParams().temperature == 1.0 and not SamplingParams().greedy
    assert SamplingParams.from_dict({"max_tokens": 16}).temperature == 1.0
    assert "vLLM's: temperature=1.0" in SamplingParams.__doc__
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert parser.parse_args([]).temperature == 0.0
    (flag,) = [action for action in parser._actions if "--temperature" in action.option_strings]
    assert "0 = greedy" in flag.help and "CLI's default" in flag.help and "1.0, like vLLM" in flag.help


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=1.5), r"top_p must be a finite number in \(0, 1\], got 1.5"),
    (dict(top_p=0.0), r"top_p .* \(0, 1\]"),
    (dict(temperature=-0.1), r"temperature .* \[0, 100\]"),
    (dict(temperature=math.nan), r"temperature .* got nan"),
    (dict(temperature=math.inf), r"temperature .* got inf"),
    (dict(min_p=-math.inf), r"min_p .* \[0, 1\]"),
    (dict(top_k=-2), r"top_k must be -1 or 0 \(off\) or an integer >= 1"),
    (dict(top_k=2.0), r"top_k"),
    (dict(repetition_penalty=0.0), r"repetition_penalty .* \(0, 10\]"),
    (dict(presence_penalty=2.5), r"presence_penalty .* \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty .* \[-2, 2\]"),
    (dict(max_tokens=0), r"max_tokens must be an integer in \[1, "),
    (dict(max_tokens=True), r"max_tokens .* got True"),  # bool is not an int
    (dict(max_tokens=5, min_tokens=6), r"min_tokens must be an integer in \[0, max_tokens=5\], got 6"),
    (dict(n=0), r"n must be an integer in \[1, 16\]"),
    (dict(n=MAX_N + 1), r"n must be an integer in \[1, 16\]"),
    (dict(n=1.0), r"n must be an integer"),
    (dict(logprobs=MAX_LOGPROBS + 1), r"logprobs must be None or an integer in \[0, 20\]"),
    (dict(logprobs=-1), r"logprobs"),
    (dict(seed=-1), r"seed must be None or an integer in \[0, 2\*\*64 - 1\]"),
    (dict(seed=2**64), r"seed"),
    (dict(seed="42"), r"seed"),
    (dict(stop=[""]), r"stop\[0\] must be a non-empty string"),
    (dict(stop=["ok", 3]), r"stop\[1\] must be a non-empty string"),
    (dict(stop=3), r"stop must be a string or a list of strings"),
    (dict(stop_token_ids=[1, -4]), r"stop_token_ids\[1\] must be a token id >= 0"),
    (dict(stop_token_ids=[True]), r"stop_token_ids\[0\]"),
    (dict(stop_token_ids=5), r"stop_token_ids must be a list of token ids"),
    (dict(ignore_eos=1), r"ignore_eos must be a bool"),
    (dict(skip_special_tokens="yes"), r"skip_special_tokens must be a bool"),
    (dict(temperature="hot"), r"temperature must be a finite number"),
    (dict(temperature=10**400), r"temperature"),
    (dict(temperature=10**5000), r"temperature .* too large to print"),
])
def test_invalid_values_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_hostile_sizes_are_rejected_fast_with_short_messages():
    cases = [
        dict(stop=[f"s{i}" for i in range(10_000)]),
        dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]),
        dict(stop=["y" * 1_000_000]),
        dict(stop_token_ids=list(range(10_000))),
    ]
    for kwargs in cases:
        start = time.perf_counter()
        with pytest.raises(ValueError) as error:
            SamplingParams(**kwargs)
        assert time.perf_counter() - start < 0.1
        assert len(str(error.value)) < 300
    SamplingParams(stop=["z" * MAX_STOP_STRING_CHARS] * 1 + [f"w{i}" for i in range(MAX_STOP_STRINGS - 1)])


def test_check_vocab_names_the_bad_id():
    SamplingParams(stop_token_ids=[9]).check_vocab(10)
    with pytest.raises(ValueError, match=r"stop_token_ids\[1\] must be a token id in \[0, 9\], got 10"):
        SamplingParams(stop_token_ids=[3, 10]).check_vocab(10)


def test_from_dict_rejects_unknown_fields_by_name():
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) 'best_of', 'topp'"):
        SamplingParams.from_dict({"topp": 0.5, "best_of": 2, "temperature": 0.3})
    with pytest.raises(ValueError, match="mapping"):
        SamplingParams.from_dict([("temperature", 0.3)])
    params = SamplingParams(temperature=0.3, top_p=0.8, stop=["\n"], stop_token_ids=[2], logprobs=3, seed=9)
    assert SamplingParams.from_dict(params.to_dict()) == params


FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.one_of(st.text(max_size=3), st.integers(-3, 3)), max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SamplingParams.field_names() + ("bogus",)), FIELD_VALUES))
def test_any_input_builds_valid_params_or_raises_value_error(values):
    try:
        params = SamplingParams.from_dict(values)
    except ValueError:
        return
    # Whatever got through satisfies every documented range.
    assert 1 <= params.n <= MAX_N and 0 <= params.min_tokens <= params.max_tokens
    assert 0.0 <= params.temperature <= 100.0 and 0.0 < params.top_p <= 1.0
    assert params.top_k >= 0 and 0.0 <= params.min_p <= 1.0
    assert params.logprobs is None or 0 <= params.logprobs <= MAX_LOGPROBS
    assert all(isinstance(s, str) and s for s in params.stop)
    assert SamplingParams.from_dict(params.to_dict()) == params
