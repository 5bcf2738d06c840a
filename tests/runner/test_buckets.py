"""Every step the scheduler can produce maps to one compiled bucket that holds it."""

import itertools

import pytest

from jaxpaged.runner.buckets import Buckets


@pytest.mark.parametrize("max_num_seqs,max_tokens", [(1, 16), (8, 32), (16, 256), (256, 2048),
                                                     (48, 100)])  # fmt: skip
def test_every_step_fits_exactly_one_compiled_bucket(max_num_seqs, max_tokens):
    buckets = Buckets.make(max_num_seqs, max_tokens)
    keys = buckets.all_keys()
    assert len(keys) == len(set(keys))
    for num_reqs, extra in itertools.product(range(1, max_num_seqs + 1), (0, 1, 7, 300)):
        num_tokens = min(num_reqs + extra, max_tokens)
        decode = extra == 0
        t, r, d = buckets.select(num_tokens, num_reqs, decode)
        assert (t, r, d) in keys and d == decode
        assert t >= num_tokens and r >= num_reqs
        if decode:
            assert t == r < 2 * num_reqs  # a power of two, or max_num_seqs
        else:
            assert t == buckets.mixed_tokens[0] or t < 2 * num_tokens  # next power of two


def test_bucket_count_llama_serving_defaults():
    keys = Buckets.make(256, 2048).all_keys()
    assert len(keys) == 9 + 5  # decode 1..256, mixed 128..2048
    assert max(keys) == (2048, 256, False)
    keys = Buckets.make(1024, 16384).all_keys()  # vLLM's offline defaults on an H100/H200
    assert len(keys) == 11 + 8  # decode 1..1024, mixed 128..16384
    assert min(k for k in keys if not k[2]) == (128, 128, False)
    assert Buckets.make(8, 64).mixed_tokens == (64,)  # a budget under 128 is one bucket
