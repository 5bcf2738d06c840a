"""SamplingParams.clone: an equal copy whose containers are its own."""

from __future__ import annotations

import dataclasses

from jaxpaged.sampling_params import SamplingParams


def test_clone_is_equal_and_shares_no_container():
    params = SamplingParams(stop=["x"], stop_token_ids=[3], logit_bias={5: 1.0}, seed=7)
    params.update_from_generation_config({2})
    copy = params.clone()
    assert copy == params and copy is not params
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, list | dict | set):
            assert getattr(copy, f.name) is not value, f.name
    copy.stop.append("y")
    copy.stop_token_ids.append(4)
    copy.logit_bias[6] = 2.0
    copy.all_stop_token_ids.add(9)
    assert params.stop == ["x"] and params.stop_token_ids == [3]
    assert params.logit_bias == {5: 1.0} and params.all_stop_token_ids == {2, 3}
