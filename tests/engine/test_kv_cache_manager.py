"""KVCacheManager: exact block tables, prefix hits, eviction order, the num_tokens - 1 cap."""

import pytest

from jaxpaged.engine.block_pool import hash_block_tokens
from jaxpaged.engine.kv_cache_manager import KVCacheManager
from jaxpaged.engine.request import Request
from jaxpaged.sampling_params import SamplingParams

BS = 4


def make_request(request_id, prompt, cache_salt=None, max_tokens=8):
    return Request(request_id, prompt, SamplingParams(), max_tokens, cache_salt=cache_salt)


def make_manager(num_blocks=10, enable_caching=True, max_model_len=64):
    return KVCacheManager(num_blocks, BS, enable_caching, max_model_len)


def run_step(manager, request, num_tokens):
    """Allocate, 'compute' num_tokens and cache, as the scheduler does around one step."""
    new_blocks = manager.allocate_slots(request, num_tokens)
    assert new_blocks is not None
    request.num_computed_tokens += num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return [b.block_id for b in new_blocks]


def admit(manager, request):
    blocks, num_hit = manager.get_computed_blocks(request)
    new = manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, blocks)
    assert new is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return num_hit


def free_ids(manager):
    return [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]


def test_allocate_exact_block_ids_and_growth():
    manager = make_manager()
    req = make_request("a", list(range(10)))
    assert run_step(manager, req, 10) == [1, 2, 3]
    assert manager.get_block_ids("a") == [1, 2, 3]
    req.append_output_token_ids([100])  # 11 tokens: still fits block 3
    assert run_step(manager, req, 1) == []
    req.append_output_token_ids([101])  # 12 tokens
    assert run_step(manager, req, 1) == []
    req.append_output_token_ids([102])  # 13 tokens: needs a 4th block
    assert run_step(manager, req, 1) == [4]
    assert manager.get_block_ids("a") == [1, 2, 3, 4]
    assert manager.usage == pytest.approx(4 / 9)


def test_allocate_none_changes_nothing():
    manager = make_manager(num_blocks=4)  # 3 usable blocks
    big = make_request("big", list(range(13)))  # needs 4
    assert manager.allocate_slots(big, 13) is None
    assert manager.get_num_free_blocks() == 3
    assert manager.get_block_ids("big") == [] and "big" not in manager.req_to_blocks
    small = make_request("small", list(range(9)))
    assert run_step(manager, small, 9) == [1, 2, 3]
    small.append_output_token_ids([5, 6, 7, 8])  # 13 tokens
    assert manager.allocate_slots(small, 4) is None
    assert manager.get_block_ids("small") == [1, 2, 3]


def test_prefix_hit_shares_blocks():
    manager = make_manager()
    a = make_request("a", list(range(10)))
    assert admit(manager, a) == 0
    b = make_request("b", list(range(8)) + [50, 51, 52])
    blocks, num_hit = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [1, 2] and num_hit == 8
    new = manager.allocate_slots(b, 3, num_hit, blocks)
    assert [blk.block_id for blk in new] == [4]
    assert manager.get_block_ids("b") == [1, 2, 4]
    assert [blk.ref_cnt for blk in manager.block_pool.blocks[1:5]] == [2, 2, 1, 1]
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10 + 11, 8)


def test_caching_waits_until_tokens_are_computed():
    manager = make_manager()
    a = make_request("a", list(range(8)))
    manager.allocate_slots(a, 8)  # scheduled, not yet computed
    b = make_request("b", list(range(9)))
    assert manager.get_computed_blocks(b) == ([], 0)
    a.num_computed_tokens = 8
    manager.cache_blocks(a, 8)
    blocks, num_hit = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [1, 2] and num_hit == 8


def test_partial_chunk_caches_only_full_computed_blocks():
    manager = make_manager()
    a = make_request("a", list(range(12)))
    run_step(manager, a, 6)  # blocks 1, 2; only block 1 is full
    assert manager.num_cached_blocks["a"] == 1
    assert manager.block_pool.blocks[1].block_hash is not None
    assert manager.block_pool.blocks[2].block_hash is None
    run_step(manager, a, 6)
    assert manager.num_cached_blocks["a"] == 3


def test_cap_recomputes_last_token():
    manager = make_manager()
    admit(manager, make_request("a", list(range(8))))  # two full cached blocks
    same = make_request("b", list(range(8)))
    blocks, num_hit = manager.get_computed_blocks(same)
    # 8 tokens fully cached, but the last one is recomputed: only 1 block (4 tokens) hits.
    assert [blk.block_id for blk in blocks] == [1] and num_hit == 4
    longer = make_request("c", list(range(9)))
    blocks, num_hit = manager.get_computed_blocks(longer)
    assert [blk.block_id for blk in blocks] == [1, 2] and num_hit == 8


def test_eviction_order_lru_tail_first():
    manager = make_manager(num_blocks=8)  # usable 1..7
    a = make_request("a", list(range(12)))
    admit(manager, a)  # blocks 1, 2, 3, all cached
    manager.free(a)
    assert free_ids(manager) == [4, 5, 6, 7, 3, 2, 1]
    filler = make_request("f", list(range(100, 120)))  # 20 tokens: 5 blocks
    assert run_step(manager, filler, 20) == [4, 5, 6, 7, 3]
    assert manager.block_pool.blocks[3].block_hash is not None  # now filler's block 5
    # a's last block was evicted first; its first two are still hits.
    again = make_request("a2", list(range(12)) + [9])
    blocks, num_hit = manager.get_computed_blocks(again)
    assert [blk.block_id for blk in blocks] == [1, 2] and num_hit == 8


def test_evictable_hits_do_not_count_as_free():
    manager = make_manager(num_blocks=4)  # usable 1, 2, 3
    a = make_request("a", list(range(8)))
    admit(manager, a)  # blocks 1, 2 cached
    hog = make_request("hog", [99])
    run_step(manager, hog, 1)  # block 3
    manager.free(a)  # free: 2, 1 (both cached)
    b = make_request("b", list(range(8)) + [7, 7, 7])  # hits 2 blocks, needs 1 more
    blocks, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8
    assert manager.allocate_slots(b, 3, num_hit, blocks) is None
    assert manager.get_num_free_blocks() == 2 and [blk.ref_cnt for blk in blocks] == [0, 0]
    manager.free(hog)
    assert [blk.block_id for blk in manager.allocate_slots(b, 3, num_hit, blocks)] == [3]
    assert manager.get_block_ids("b") == [1, 2, 3]


def test_cache_salt_isolates_prefixes():
    manager = make_manager(num_blocks=20)
    prompt = list(range(9))
    admit(manager, make_request("plain", prompt))
    admit(manager, make_request("salt-x", prompt, cache_salt="x"))
    for rid, salt, expected_hit in [("p2", None, 8), ("x2", "x", 8), ("y", "y", 0)]:
        req = make_request(rid, prompt, cache_salt=salt)
        blocks, num_hit = manager.get_computed_blocks(req)
        assert num_hit == expected_hit, rid
    x2 = make_request("x3", prompt, cache_salt="x")
    blocks, _ = manager.get_computed_blocks(x2)
    assert [blk.block_id for blk in blocks] == [4, 5]  # salt-x's own blocks
    plain = make_request("p3", prompt)
    manager.update_block_hashes(plain)
    # The salt is in the first block's hash, and the chain carries it to every later block.
    assert plain.block_hashes[0] == hash_block_tokens(None, prompt[:4])
    assert x2.block_hashes[0] == hash_block_tokens(None, prompt[:4], ("x",))
    assert all(p != s for p, s in zip(plain.block_hashes, x2.block_hashes, strict=True))


def test_block_hashes_follow_tokens():
    manager = make_manager()
    req = make_request("a", list(range(6)))
    run_step(manager, req, 6)
    assert req.block_hashes == [hash_block_tokens(None, [0, 1, 2, 3])]
    req.append_output_token_ids([6, 7])
    run_step(manager, req, 1)
    run_step(manager, req, 1)
    h0 = hash_block_tokens(None, [0, 1, 2, 3])
    assert req.block_hashes == [h0, hash_block_tokens(h0, [4, 5, 6, 7])]
    assert all(isinstance(h, bytes) and len(h) == 32 for h in req.block_hashes)


def test_preempted_request_readmission_hits_its_own_blocks():
    manager = make_manager()
    req = make_request("a", list(range(10)))
    run_step(manager, req, 10)
    for tok in (10, 11, 12):
        req.append_output_token_ids([tok])
        run_step(manager, req, 1)  # after 12 computed tokens, block 3 is full and cached
    req.append_output_token_ids([13])  # 14 tokens, 13 computed
    manager.free(req)
    req.num_computed_tokens = 0
    blocks, num_hit = manager.get_computed_blocks(req)
    assert [blk.block_id for blk in blocks] == [1, 2, 3] and num_hit == 12
    # Its 4th block (13th token, not full) went to the queue first, behind the never-used 5..9.
    assert free_ids(manager) == [5, 6, 7, 8, 9, 4, 3, 2, 1]
    new = manager.allocate_slots(req, 2, num_hit, blocks)
    assert [blk.block_id for blk in new] == [5]
    assert free_ids(manager) == [6, 7, 8, 9, 4]


def test_caching_disabled():
    manager = make_manager(enable_caching=False)
    a = make_request("a", list(range(9)))
    admit(manager, a)
    b = make_request("b", list(range(9)))
    assert manager.get_computed_blocks(b) == ([], 0)
    assert a.block_hashes == [] and not manager.block_pool.cached_block_hash_to_block
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)


def test_allocate_rejects_zero_tokens():
    manager = make_manager()
    with pytest.raises(ValueError, match="num_new_tokens"):
        manager.allocate_slots(make_request("a", [1]), 0)


def test_decode_slot_inside_its_blocks_takes_no_block_and_caches_computed_blocks():
    manager = make_manager()
    req = make_request("a", list(range(7)))
    assert [b.block_id for b in manager.allocate_slots(req, 7)] == [1, 2]
    req.num_computed_tokens = 7  # computed, not yet cached (update_from_output's job)
    free_before = manager.get_num_free_blocks()
    req.append_output_token_ids([7])  # 8 tokens: the new slot is block 2's last
    assert manager.allocate_slots(req, 1) == []
    assert manager.get_num_free_blocks() == free_before
    # The 7 computed tokens fill block 1: registered here, so another request hits it.
    assert manager.num_cached_blocks["a"] == 1
    blocks, num_hit = manager.get_computed_blocks(make_request("b", list(range(6))))
    assert [b.block_id for b in blocks] == [1] and num_hit == 4
