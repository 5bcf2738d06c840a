"""One host-to-device transfer per step: the step's small input arrays packed into one buffer.

A step has ~22 small inputs (token ids, positions, slots, block tables, sampling rows). Put
one by one, they cost ~0.9 ms of host time per step on an H200 host, one packed int32 array
0.07 ms (docs/benchmarks.md, "Host overhead"). The layout (tree structure, shapes, dtypes)
is static per bucket: the host packs by it and the jitted step unpacks by it, so unpacking
is free slicing and bitcasts inside the compiled step.

    pack(tree, layout)         numpy leaves -> int32[layout.size]       (host)
    unpack(buf, layout)        int32[layout.size] -> the same pytree    (inside jit)
    pack_traced(tree, layout)  jax leaves -> int32[layout.size]         (inside jit)
    unpack_host(buf, layout)   numpy int32[:n] -> the leaves that fit   (host)

The step's outputs go the other way with pack_traced / unpack_host when the runner keeps
them in one persistent buffer (ModelRunner(stable_buffers=True)).

Leaves may be int32, uint32, float32 (bitcast) or bool (0/1). Every leaf starts at a
256-byte boundary: XLA may hand a kernel a slice of the buffer without copying it, and Mosaic
GPU kernels reject operands that are not 256-byte aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_BITCAST = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.float32))
_BOOL = np.dtype(np.bool_)
_ALIGN = 64  # int32 words: 256 bytes


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class PackLayout:
    treedef: Any
    specs: tuple[tuple[tuple[int, ...], np.dtype], ...]  # per leaf: shape, dtype

    @classmethod
    def of(cls, tree) -> PackLayout:
        leaves, treedef = jax.tree.flatten(tree)
        specs = []
        for x in leaves:
            dtype = np.dtype(np.asarray(x).dtype)
            if dtype not in _BITCAST and dtype != _BOOL:
                raise TypeError(f"cannot pack a leaf of dtype {dtype} (int32/uint32/f32/bool)")
            specs.append((tuple(np.shape(x)), dtype))
        return cls(treedef, tuple(specs))

    @property
    def size(self) -> int:
        return sum(_aligned(math.prod(shape)) for shape, _ in self.specs)


def pack(tree, layout: PackLayout) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(layout.specs):
        raise ValueError(f"{len(leaves)} leaves for a layout of {len(layout.specs)}")
    parts = []
    for x, (shape, dtype) in zip(leaves, layout.specs, strict=True):
        x = np.asarray(x)
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(f"leaf {x.shape}:{x.dtype} does not match {shape}:{dtype}")
        flat = (x.astype(np.int32) if dtype == _BOOL else x.view(np.int32)).ravel()
        parts += [flat, np.zeros(_aligned(flat.size) - flat.size, np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def unpack(buf: jax.Array, layout: PackLayout):
    leaves, offset = [], 0
    for shape, dtype in layout.specs:
        n = math.prod(shape)
        x = buf[offset : offset + n].reshape(shape)
        offset += _aligned(n)
        if dtype == _BOOL:
            x = x != 0
        elif dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        leaves.append(x)
    return jax.tree.unflatten(layout.treedef, leaves)


def pack_traced(tree, layout: PackLayout) -> jax.Array:
    """pack() inside jit: the leaves of `tree` (jax arrays) -> int32[layout.size]."""
    parts = []
    for x, (shape, dtype) in zip(jax.tree.leaves(tree), layout.specs, strict=True):
        flat = x.reshape(math.prod(shape))
        if dtype in (_BOOL, np.int32):
            flat = flat.astype(jnp.int32)
        else:
            flat = jax.lax.bitcast_convert_type(flat.astype(dtype), jnp.int32)
        parts += [flat, jnp.zeros(_aligned(flat.size) - flat.size, jnp.int32)]
    return jnp.concatenate(parts) if parts else jnp.zeros(0, jnp.int32)


def unpack_host(buf: np.ndarray, layout: PackLayout) -> list[np.ndarray]:
    """The leading leaves of a packed buffer, on the host: as many as `buf` holds whole
    (a buffer cut after the first leaf gives just that leaf)."""
    leaves, offset = [], 0
    for shape, dtype in layout.specs:
        n = math.prod(shape)
        if offset + n > buf.size:
            break
        x = buf[offset : offset + n].reshape(shape)
        leaves.append(x != 0 if dtype == _BOOL else x.view(dtype))
        offset += _aligned(n)
    return leaves


def leading_words(layout: PackLayout, num_leaves: int) -> int:
    """Words of a packed buffer that hold its first `num_leaves` leaves."""
    return sum(_aligned(math.prod(shape)) for shape, _ in layout.specs[:num_leaves])


def leaf_offsets(layout: PackLayout) -> list[int]:
    """Where each leaf starts in a packed buffer (int32 words)."""
    return [leading_words(layout, i) for i in range(len(layout.specs))]
