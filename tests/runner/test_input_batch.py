"""InputBatch.append_tokens: the host's copy of each slot's tokens after a step."""

import numpy as np

from jaxpaged.runner.input_batch import InputBatch


def test_append_tokens_extends_only_the_given_slots():
    batch = InputBatch(max_num_seqs=4, max_model_len=16, block_size=4, vocab_size=8)
    batch.token_ids[:, :3] = [[1, 2, 3], [4, 5, 0], [6, 0, 0], [7, 7, 7]]
    batch.num_tokens[:] = [3, 2, 1, 3]
    batch.append_tokens(np.array([2, 0], np.int32), np.array([5, 6], np.int32))
    assert batch.num_tokens.tolist() == [4, 2, 2, 3]
    assert batch.token_ids[0, :4].tolist() == [1, 2, 3, 6]
    assert batch.token_ids[2, :2].tolist() == [6, 5]
    assert batch.token_ids[1, :3].tolist() == [4, 5, 0]  # untouched
    batch.append_tokens(np.array([], np.int32), np.array([], np.int32))  # nothing sampled
    assert batch.num_tokens.tolist() == [4, 2, 2, 3]
