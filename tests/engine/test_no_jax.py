"""The engine layer is pure Python + numpy: importing any jaxpaged.engine module loads no jax.

Modules are discovered with pkgutil, so files added later are covered. Each import runs in a
fresh interpreter, since this test process may already have jax loaded by other tests.
"""

import pkgutil
import subprocess
import sys

import pytest

import jaxpaged.engine

ENGINE_MODULES = sorted(
    f"jaxpaged.engine.{m.name}" for m in pkgutil.iter_modules(jaxpaged.engine.__path__)
)

_CHECK = """
import importlib, sys
importlib.import_module({module!r})
loaded = sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib")))
assert not loaded, f"{module} imported {{loaded[:5]}}"
"""


def test_discovers_the_core_modules():
    for name in ("block_pool", "kv_cache_manager", "request", "scheduler", "scheduler_output"):
        assert f"jaxpaged.engine.{name}" in ENGINE_MODULES


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_module_does_not_import_jax(module):
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK.format(module=module)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
