"""BlockPool and FreeBlockQueue: exact block ids, LRU order, eviction of cached hashes."""

import hashlib

import numpy as np
import pytest

from jaxpaged.engine.block_pool import (
    BlockPool,
    FreeBlockQueue,
    KVCacheBlock,
    hash_block_tokens,
)


def ids(blocks):
    return [b.block_id for b in blocks]


def free_ids(pool):
    return ids(pool.free_block_queue.get_all_free_blocks())


def test_free_queue_popleft_remove_append():
    blocks = [KVCacheBlock(i) for i in range(1, 6)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5
    assert q.popleft().block_id == 1
    q.remove(blocks[2])  # block 3, from the middle
    q.append(blocks[0])
    assert ids(q.get_all_free_blocks()) == [2, 4, 5, 1]
    assert not q.contains(blocks[2]) and q.contains(blocks[0])
    with pytest.raises(ValueError):
        q.remove(blocks[2])
    with pytest.raises(ValueError):
        q.append(blocks[0])
    for expected in (2, 4, 5, 1):
        assert q.popleft().block_id == expected
    with pytest.raises(ValueError):
        q.popleft()
    assert len(q) == 0


def test_null_block_never_handed_out():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    assert pool.null_block.block_id == 0
    assert pool.get_num_free_blocks() == 3
    assert ids(pool.get_new_blocks(3)) == [1, 2, 3]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="null block"):
        BlockPool(num_blocks=1, enable_caching=True)


def test_free_appends_in_given_order_and_usage():
    pool = BlockPool(num_blocks=6, enable_caching=False)
    a = pool.get_new_blocks(3)  # 1, 2, 3
    assert pool.get_usage() == pytest.approx(3 / 5)
    pool.free_blocks(reversed(a))
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    assert all(b.ref_cnt == 0 for b in a)
    assert pool.get_usage() == 0.0
    # LRU: the next allocation takes the blocks freed longest ago first.
    assert ids(pool.get_new_blocks(4)) == [4, 5, 3, 2]


def test_touch_pulls_free_block_out_and_shares():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    a = pool.get_new_blocks(2)  # 1, 2
    pool.touch([a[0]])
    assert a[0].ref_cnt == 2
    pool.free_blocks([a[0]])
    assert a[0].ref_cnt == 1 and free_ids(pool) == [3, 4]
    pool.free_blocks([a[1], a[0]])
    assert free_ids(pool) == [3, 4, 2, 1]
    pool.touch([a[1]])  # hit on a free block: it leaves the queue
    assert a[1].ref_cnt == 1 and free_ids(pool) == [3, 4, 1]


def test_cache_evict_on_reuse():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    h0 = hash_block_tokens(None, [1, 2])
    h1 = hash_block_tokens(h0, [3, 4])
    pool.cache_full_blocks(blocks, [h0, h1], 0, 2)
    assert pool.get_cached_block(h0) is blocks[0] and blocks[1].block_hash == h1
    pool.free_blocks(reversed(blocks))  # free queue: 3, 2, 1
    assert pool.get_cached_block(h1) is blocks[1]  # freed blocks stay cached
    got = pool.get_new_blocks(2)  # 3 (never cached), then 2 (cached h1: evicted)
    assert ids(got) == [3, 2]
    assert pool.get_cached_block(h1) is None and blocks[1].block_hash is None
    assert pool.get_cached_block(h0) is blocks[0]


def test_cache_keeps_first_copy_of_duplicate_hash():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    a, b = pool.get_new_blocks(1), pool.get_new_blocks(1)
    h = hash_block_tokens(None, [7, 7])
    pool.cache_full_blocks(a, [h], 0, 1)
    pool.cache_full_blocks(b, [h], 0, 1)
    assert pool.get_cached_block(h) is a[0] and b[0].block_hash is None
    pool.free_blocks(b)
    pool.get_new_blocks(2)  # evicting b's block must not drop a's entry
    assert pool.get_cached_block(h) is a[0]


def test_caching_disabled_caches_nothing():
    pool = BlockPool(num_blocks=3, enable_caching=False)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks, [hash_block_tokens(None, [1])], 0, 1)
    assert blocks[0].block_hash is None and not pool.cached_block_hash_to_block


def test_reset_prefix_cache_refused_while_blocks_held():
    pool = BlockPool(num_blocks=3, enable_caching=True)
    blocks = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_full_blocks(blocks, [h], 0, 1)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h) is None and blocks[0].block_hash is None


def test_hash_is_full_sha256_digest_of_canonical_bytes():
    root = hashlib.sha256(b"jaxpaged.block_pool.root").digest()
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    expected = hashlib.sha256(root)
    expected.update((4).to_bytes(8, "little"))
    expected.update(np.array([1, 2, 3, 4], dtype="<i8").tobytes())
    assert isinstance(h0, bytes) and len(h0) == 32
    assert h0 == expected.digest()
    # The chain, the tokens and the extra keys each change the digest.
    assert hash_block_tokens(h0, [1, 2, 3, 4]) != h0
    assert hash_block_tokens(None, [1, 2, 3, 5]) != h0
    assert hash_block_tokens(None, [1, 2, 3, 4], ("salt",)) != h0
    # Length-prefixed extra keys: ("ab", "c") and ("a", "bc") must differ.
    assert hash_block_tokens(None, [1], ("ab", "c")) != hash_block_tokens(None, [1], ("a", "bc"))
    # Python's hash() collides on -1 and -2; the byte encoding does not.
    assert hash((-1,)) == hash((-2,))
    assert hash_block_tokens(None, [-1]) != hash_block_tokens(None, [-2])
    # Large ids are not truncated.
    assert hash_block_tokens(None, [2**40]) != hash_block_tokens(None, [0])


def test_lookup_uses_whole_key():
    """Keys sharing a long prefix (e.g. a truncated digest) must not alias."""
    pool = BlockPool(num_blocks=4, enable_caching=True)
    a, b = pool.get_new_blocks(1), pool.get_new_blocks(1)
    ka = bytes(31) + b"\x01"
    kb = bytes(31) + b"\x02"
    pool.cache_full_blocks(a, [ka], 0, 1)
    pool.cache_full_blocks(b, [kb], 0, 1)
    assert pool.get_cached_block(ka) is a[0]
    assert pool.get_cached_block(kb) is b[0]
    assert pool.get_cached_block(bytes(31) + b"\x03") is None
