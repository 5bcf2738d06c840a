"""The pool of KV blocks: reference counts, an LRU free queue and the prefix-cache hash map.

Every block is in exactly one of two states:

    ref_cnt > 0   held by one or more requests (more than one only through a prefix-cache hit)
    ref_cnt == 0  in the free queue; if it carries a block_hash its KV is still valid and a
                  later request may take it back with `touch` (a cache hit) until
                  `get_new_blocks` pops it for someone else, which evicts the hash

    free queue:  head -> [least recently freed ... most recently freed] <- tail
                 get_new_blocks pops from the head; free_blocks appends to the tail

Block 0 is the null block: padding tokens' slots point into it, so it is never handed out.
Hash keys are full sha256 digests (bytes), so two different prefixes never share a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

BlockHash = bytes
"""sha256 digest of (parent hash, the block's token ids, extra keys)."""

# Parent of the first block: a fixed digest, so every chain starts from the same 32 bytes.
_ROOT_HASH: BlockHash = hashlib.sha256(b"jaxpaged.block_pool.root").digest()


def _encode_extra_key(key: object) -> bytes:
    # Type tag + length prefix keep the encoding unambiguous ("ab" + "c" != "a" + "bc").
    if isinstance(key, bytes):
        tag, data = b"b", key
    elif isinstance(key, str):
        tag, data = b"s", key.encode("utf-8")
    elif isinstance(key, int):
        tag, data = b"i", str(key).encode("ascii")
    else:
        raise TypeError(f"unsupported extra key type {type(key).__name__}: {key!r}")
    return tag + len(data).to_bytes(8, "little") + data


def hash_block_tokens(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[object, ...] | None = None,
) -> BlockHash:
    """Chained hash of one full block: sha256(parent || n || tokens as int64 || extra keys)."""
    tokens = np.asarray(token_ids, dtype="<i8")
    h = hashlib.sha256(_ROOT_HASH if parent_hash is None else parent_hash)
    h.update(len(tokens).to_bytes(8, "little"))
    h.update(tokens.tobytes())
    for key in extra_keys or ():
        h.update(_encode_extra_key(key))
    return h.digest()


class KVCacheBlock:
    """One block of the pool; prev/next link it into the free queue while ref_cnt == 0."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free_block", "next_free_block")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free_block: KVCacheBlock | None = None
        self.next_free_block: KVCacheBlock | None = None

    @property
    def is_null(self) -> bool:
        return self.block_id == 0

    def __repr__(self) -> str:
        cached = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}, hash={cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in LRU order; popleft, remove and append are O(1).

    Two sentinel blocks (id -1) bound the list so that no operation special-cases the ends,
    and a block is in the queue exactly when its prev link is set.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free_block
        if block is self._tail:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        if block.prev_free_block is not None:
            raise ValueError(f"{block} is already in the free queue")
        last = self._tail.prev_free_block
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def contains(self, block: KVCacheBlock) -> bool:
        return block.prev_free_block is not None

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Head (next to be evicted) to tail; O(n), for tests and debugging."""
        out, block = [], self._head.next_free_block
        while block is not self._tail:
            out.append(block)
            block = block.next_free_block
        return out


class BlockPool:
    """Hands out, shares, frees and caches the pool's blocks (ids 1 .. num_blocks - 1)."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}."
            )
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.free_block_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        """Invariant: block.block_hash is h  <=>  cached_block_hash_to_block[h] is block."""

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Register blocks[num_cached_blocks:num_full_blocks], whose KV is now computed.

        A block already cached (it came from a hit) keeps its entry. When another block
        already holds the same hash (two requests computed the same prefix side by side),
        the first one stays the cached copy and this one stays uncached; it is simply freed
        when its request ends.
        """
        if not self.enable_caching:
            return
        for i in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is not None:
                assert block.block_hash == block_hash, f"{block} re-cached under another hash"
                continue
            if block_hash in self.cached_block_hash_to_block:
                continue
            block.block_hash = block_hash
            self.cached_block_hash_to_block[block_hash] = block

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop num_blocks from the LRU head (evicting their cached hashes); ref_cnt becomes 1."""
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(
                f"cannot allocate {num_blocks} blocks; only {self.get_num_free_blocks()} free."
            )
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0, block
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self.cached_block_hash_to_block[block.block_hash]
            block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A cache hit: take a reference, pulling a free block back out of the free queue."""
        for block in blocks:
            assert not block.is_null, "the null block is never shared"
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the tail in the given order.

        Callers pass a request's blocks tail first, so that its last blocks (the least
        likely to be shared by another prompt) are evicted before its first ones.
        """
        for block in ordered_blocks:
            assert not block.is_null and block.ref_cnt > 0, block
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def get_num_free_blocks(self) -> int:
        """Blocks nobody holds, evictable cached blocks included."""
        return len(self.free_block_queue)

    def get_usage(self) -> float:
        """Fraction of the usable blocks (null block excluded) held by requests, in [0, 1]."""
        return 1.0 - self.get_num_free_blocks() / (self.num_blocks - 1)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any request holds blocks."""
        if self.get_num_free_blocks() != self.num_blocks - 1:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True
