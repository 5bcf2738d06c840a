"""The executable cache: keys that change with what the executable depends on, a round trip,
and unusable entries that fall back to compiling."""

import jax
import jax.numpy as jnp

from jaxpaged.attention.pallas import PallasBackend
from jaxpaged.runner.executable_cache import ExecutableCache, compile_fresh, describe_backend


def test_backend_settings_and_argument_shapes_change_the_key(tmp_path):
    cache = ExecutableCache(str(tmp_path))
    nhd = describe_backend(PallasBackend(layout="NHD"))
    hnd = describe_backend(PallasBackend(layout="HND"))
    assert nhd != hnd and "layout='HND'" in hnd
    x = jnp.zeros(4)
    assert cache.key(nhd, x) != cache.key(hnd, x)
    assert cache.key(nhd, x) != cache.key(nhd, jnp.zeros(5))
    assert cache.key(nhd, x) == cache.key(nhd, jnp.ones(4))  # values do not matter


def test_round_trip_and_a_corrupt_entry(tmp_path):
    cache = ExecutableCache(str(tmp_path))
    # A function no other test compiles, so XLA's own cache cannot have served it.
    fn = jax.jit(lambda a: jnp.cumsum(a * 3.25) - 17.0)
    compiled, fresh = compile_fresh(fn.lower(jnp.zeros(7)))
    assert fresh
    key = cache.key("roundtrip", jnp.zeros(7))
    assert cache.load(key, [jax.devices()[0]]) is None
    cache.store(key, compiled)
    loaded = cache.load(key, [jax.devices()[0]])
    assert loaded is not None and cache.hits == 1
    assert jnp.array_equal(loaded(jnp.arange(7.0)), compiled(jnp.arange(7.0)))
    (tmp_path / f"{key}.bin").write_bytes(b"not a pickle")
    assert cache.load(key, [jax.devices()[0]]) is None  # warned, and the caller recompiles
