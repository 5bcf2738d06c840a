"""On-disk cache of compiled step executables, so a second start skips tracing and compiling.

XLA's persistent compilation cache only saves the compile: every start still traces and
lowers each bucket of the unrolled model (seconds per bucket for a 32-layer model). This
cache stores the compiled executable itself (`jax.experimental.serialize_executable`) under
a key of everything the executable depends on:

    jax/jaxlib/flax versions, platform and devices, a hash of the jaxpaged and pallas_kernels
    sources, and the caller's description of the step (model config, bucket, shapes and
    shardings of every argument)

A missing, stale or unreadable entry means: compile as usual, then store. Multi-process
runs do not use it (each process would need its own entries for its devices). An executable
that XLA's persistent cache served is not stored: re-serialising one that was itself
deserialised gives an executable that fails at run time on XLA:CPU ("Function ... not
found"), so only fresh compiles are stored. (So an executable that XLA's cache already held
from a start with this cache off is lowered again at every start, and served by XLA.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
import threading

import flax
import jax
import jaxlib
from jax.experimental import serialize_executable

logger = logging.getLogger(__name__)

_PACKAGES = ("jaxpaged", "pallas_kernels")
_XLA_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_local = threading.local()


def _on_event(event: str, **kwargs) -> None:
    if event == _XLA_CACHE_HIT:
        _local.xla_cache_hit = True


jax.monitoring.register_event_listener(_on_event)


def compile_fresh(lowered) -> tuple[jax.stages.Compiled, bool]:
    """lowered.compile(); also says whether XLA compiled it (False: its persistent cache
    served it). Thread-safe: the event is recorded in the compiling thread."""
    _local.xla_cache_hit = False
    compiled = lowered.compile()
    return compiled, not _local.xla_cache_hit


@functools.cache
def source_hash() -> str:
    """sha256 over the .py files of the packages that build the step."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def describe_backend(backend, depth: int = 0) -> str:
    """The attention backend's class and settings (layout, interpret, a wrapped backend)."""
    cls = type(backend)
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    for name, value in sorted(vars(backend).items()) if hasattr(backend, "__dict__") else ():
        if isinstance(value, (str, int, float, bool, type(None), tuple)):
            parts.append(f"{name}={value!r}")
        elif hasattr(value, "kv_cache_shape") and depth < 3:
            parts.append(f"{name}=({describe_backend(value, depth + 1)})")
    return " ".join(parts)


def _describe(tree) -> str:
    """Shapes, dtypes and shardings of a pytree of arrays / ShapeDtypeStructs."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [str(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x))}:{sharding}")
    return "|".join(parts)


class ExecutableCache:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0  # counters only: updated from loader threads without a lock

    @classmethod
    def from_env(cls) -> ExecutableCache | None:
        from jaxpaged import envs

        base = envs.compilation_cache_dir()
        if base is None or jax.process_count() > 1:
            return None
        return cls(os.path.join(base, "executables"))

    def key(self, description: str, args) -> str:
        devices = ",".join(f"{d.platform}:{d.device_kind}:{d.id}" for d in jax.devices())
        text = "\n".join(
            [jax.__version__, jaxlib.__version__, flax.__version__, devices,
             source_hash(), description, _describe(args)]
        )  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.bin")

    def load(self, key: str, devices) -> jax.stages.Compiled | None:
        """The cached executable for `key`, loaded onto `devices` (those it was compiled
        for), or None."""
        path = self._path(key)
        if not os.path.exists(path):
            self.misses += 1
            return None
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=devices
            )
        except Exception as e:  # a stale or truncated entry: recompile and overwrite it
            logger.warning("executable cache entry %s unusable (%s); recompiling", path, e)
            self.misses += 1
            return None
        self.hits += 1
        return compiled

    def store(self, key: str, compiled: jax.stages.Compiled) -> None:
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(key))  # atomic: readers never see half a file
        except Exception as e:  # caching is an optimisation: never fail a start over it
            logger.warning("could not store executable %s: %s", key, e)
