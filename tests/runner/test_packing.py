"""The step's inputs survive packing into one int32 buffer and unpacking inside jit."""

import jax
import numpy as np
import pytest

from jaxpaged.runner.packing import (
    PackLayout,
    leading_words,
    pack,
    pack_traced,
    unpack,
    unpack_host,
)


def _tree(rng):
    return {
        "ids": rng.integers(-5, 1 << 30, (7,)).astype(np.int32),
        "table": rng.integers(0, 100, (3, 4)).astype(np.int32),
        "temp": rng.standard_normal(3).astype(np.float32) * 1e30,
        "seeds": rng.integers(0, 1 << 32, 3, dtype=np.uint64).astype(np.uint32),
        "mask": rng.random(3) < 0.5,
        "flag": np.asarray(True),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_round_trip_is_bit_exact_inside_jit():
    rng = np.random.default_rng(0)
    tree = _tree(rng)
    layout = PackLayout.of(tree)
    buf = pack(tree, layout)
    # Each leaf starts on a 256-byte (64-word) boundary; the empty leaf takes no room.
    assert buf.dtype == np.int32 and buf.shape == (layout.size,) == (6 * 64,)
    out = jax.jit(unpack, static_argnums=1)(buf, layout)
    for name, want in tree.items():
        got = np.asarray(out[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


def test_pack_rejects_leaves_that_do_not_match_the_layout():
    rng = np.random.default_rng(1)
    tree = _tree(rng)
    layout = PackLayout.of(tree)
    with pytest.raises(ValueError, match=r"does not match"):
        pack(dict(tree, ids=tree["ids"][:6]), layout)
    with pytest.raises(TypeError, match="cannot pack a leaf of dtype float64"):
        PackLayout.of({"x": np.zeros(2)})


def test_outputs_packed_inside_jit_unpack_on_the_host_bit_exact():
    rng = np.random.default_rng(1)
    tree = _tree(rng)
    layout = PackLayout.of(tree)
    buf = np.asarray(jax.jit(lambda t: pack_traced(t, layout))(tree))
    assert buf.shape == (layout.size,) and np.array_equal(buf, pack(tree, layout))
    leaves = unpack_host(buf, layout)
    for got, want in zip(leaves, jax.tree.leaves(tree), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    # Cut after the first leaves: just those come back.
    assert len(unpack_host(buf[: leading_words(layout, 2)], layout)) == 2
