"""The model runner: the only place that moves data between host and device.

    SchedulerOutput ─► InputBatch (apply diffs, build padded numpy inputs)
                    ─► device_put (one transfer) ─► compiled step for the bucket
                    ─► sampled ids (+ logprobs if asked) back to host ─► ModelRunnerOutput

A step is two executables, compiled ahead of time for every (tokens, requests) bucket at
start-up: `forward(params, kv_caches, last_tokens, packed) -> (kv_caches, logits)` and
`sample(logits, penalty_state, last_tokens, packed) -> (penalty_state, last_tokens, out)`,
the sampler once per SamplerMode (runner/sampler.py: the host picks whether the sort for
top-k/top-p and the top logprobs are compiled in, so the step holds no lax.cond, which
XLA:GPU would run by waiting on the host for the device). The KV pool, the penalty state and
`last_tokens` (each slot's last sampled id) are donated, so they are updated in place. A
step whose shape has no bucket is a bug, not a reason to compile in the serving loop.
`packed` is the step's StepInputs packed into one int32 buffer (one host-to-device transfer;
runner/packing.py), unpacked inside both.

`execute_model(so)` is `collect(dispatch(so))`. Under async scheduling the engine calls
`dispatch(so_k+1)` before `collect(step k)`: dispatch only enqueues device work, and a token
that step k samples reaches step k+1 through `last_tokens` on the device (input id -1), so
the host does not wait for step k before it enqueues step k+1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxpaged.attention.backend import AttentionBackend, allocate_kv_cache
from jaxpaged.attention.metadata import AttentionMetadata
from jaxpaged.config import ModelConfig
from jaxpaged.engine.scheduler_output import LogprobsLists, ModelRunnerOutput, SchedulerOutput
from jaxpaged.models.llama import build_model
from jaxpaged.runner.buckets import Buckets
from jaxpaged.runner.executable_cache import ExecutableCache, compile_fresh, describe_backend
from jaxpaged.runner.host_memory import keep_freed_host_memory
from jaxpaged.runner.input_batch import HostStep, InputBatch
from jaxpaged.runner.packing import (
    PackLayout,
    leading_words,
    leaf_offsets,
    pack,
    pack_traced,
    unpack,
    unpack_host,
)
from jaxpaged.runner.sampler import (
    ALL_MODES,
    MODE_FIELDS,
    PenaltyState,
    SamplerMode,
    SamplerOutput,
    SamplingTensors,
    init_penalty_row,
    sample,
)
from jaxpaged.sampling_params import MAX_LOGPROBS

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    md: AttentionMetadata
    logits_indices: jax.Array  # i32[R]
    sampling: SamplingTensors


def _to_inputs(hs: HostStep, decode_only: bool) -> StepInputs:
    md = AttentionMetadata(
        slot_mapping=hs.slot_mapping,
        query_start_loc=hs.query_start_loc,
        seq_lens=hs.seq_lens,
        block_tables=hs.block_tables,
        token_req_idx=hs.token_req_idx,
        decode_only=decode_only,
    )
    return StepInputs(
        token_ids=hs.token_ids,
        positions=hs.positions,
        md=md,
        logits_indices=hs.logits_indices,
        sampling=SamplingTensors(**hs.sampling),
    )


def _fetched(out, want_logprobs: bool) -> tuple:
    """The sampler outputs the host reads: the ids, and the logprob arrays if asked."""
    if not want_logprobs:
        return (out.sampled,)
    return (out.sampled, out.top_ids, out.top_logprobs, out.sampled_logprob, out.sampled_rank)


_SWITCH_INTERVAL_S = 0.0002  # the GIL switch interval with a launcher thread


@functools.cache
def _out_layout(num_reqs: int) -> PackLayout:
    """The packed SamplerOutput of a bucket with `num_reqs` rows (`sampled` first)."""
    row, top = np.zeros(num_reqs, np.int32), np.zeros((num_reqs, MAX_LOGPROBS), np.int32)
    f32 = np.float32
    return PackLayout.of(SamplerOutput(
        sampled=row, sampled_logprob=row.astype(f32), sampled_rank=row,
        top_ids=top, top_logprobs=top.astype(f32),
    ))  # fmt: skip


def _write_into(buf, data):
    """buf (donated) <- data: the result lives at buf's device address."""
    return jax.lax.dynamic_update_slice(buf, data, (0,))


def _head_copy(buf, n: int):
    """A fresh copy of buf[:n] (never buf itself, which the next step donates)."""
    return jnp.copy(buf[:n])


@dataclass
class StepHandle:
    """A dispatched step whose results the host has not read yet."""

    req_ids: list[str]
    slots: np.ndarray | None = None
    gens: np.ndarray | None = None  # slot generations at dispatch
    sample_mask: np.ndarray | None = None
    wants_logprobs: np.ndarray | None = None  # per row, at dispatch
    out: Future | None = None  # -> the device arrays to fetch (_run_step)
    num_rows: int = 0  # the bucket's request rows


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        params,
        backend: AttentionBackend,
        dtype,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        mesh_shardings=None,
        stable_buffers: bool = False,
        launch_thread: bool | None = None,
        warm_up: bool | None = None,
    ) -> None:
        self.config = model_config
        self.params = params
        self.backend = backend
        self.dtype = dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.shardings = mesh_shardings
        self.model = build_model(model_config, backend, dtype)
        self.buckets = Buckets.make(max_num_seqs, max_num_batched_tokens)
        self.input_batch = InputBatch(
            max_num_seqs, max_model_len, block_size, model_config.vocab_size
        )
        self.kv_caches = self._allocate_kv(num_blocks)
        v = model_config.vocab_size
        self.penalty_state = PenaltyState(
            jnp.zeros((max_num_seqs + 1, v), jnp.int32), jnp.zeros((max_num_seqs + 1, v), bool)
        )
        self.last_tokens = jnp.zeros(max_num_seqs + 1, jnp.int32)
        # Committed, as every step output is: the small jits' compiled versions are cached
        # per argument commitment (_device_zeros).
        self.penalty_state, self.last_tokens = jax.device_put(
            (self.penalty_state, self.last_tokens),
            jax.devices()[0] if mesh_shardings is None else mesh_shardings.replicated,
        )
        # Stable buffers: every buffer the step reads or writes keeps its device address
        # from step to step (inputs staged into a donated per-bucket buffer, outputs written
        # into another), so that XLA replays the step's CUDA graphs (command buffers) without
        # re-recording them, which it does whenever an address they use changed. Single
        # device only.
        self.stable_buffers = stable_buffers and mesh_shardings is None
        self._in_bufs: dict[tuple[int, int, bool], jax.Array] = {}
        self._out_bufs: dict[tuple[int, int, bool], jax.Array] = {}
        # The launcher thread makes the executable calls, in order: a step's calls hold
        # their thread while XLA:GPU enqueues its kernels and graphs (1.7 ms at batch 1,
        # 4.1 ms at batch 128 for the 8B shape on an H200 host, docs/benchmarks.md), so the
        # engine's own host work (scheduling, input preparation, reading results) overlaps
        # them on the calling thread.
        # On by default on GPU; on a CPU backend the extra thread only competes for cores.
        if launch_thread is None:
            env = os.environ.get("JAXPAGED_LAUNCH_THREAD")
            launch_thread = env != "0" if env else jax.default_backend() != "cpu"
        self._launcher = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxpaged-launch")
            if launch_thread
            else None
        )
        if launch_thread and sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            # The launcher needs the GIL back after each call; with Python's default 5 ms
            # switch interval it waited up to that long behind the scheduler's Python work
            # (a staging call took 5.7 ms at batch 128, docs/benchmarks.md). Process-wide.
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        keep_freed_host_memory()  # a step's MB-sized numpy inputs reuse their pages
        # compile_all runs every executable once (warm_up); on by default on GPU, where
        # first runs are slow, and off on CPU, where they are not (and tests build many).
        self.warm_up_steps = jax.default_backend() != "cpu" if warm_up is None else warm_up
        self._launch_error: Exception | None = None  # of a launched non-step call
        self._stage = jax.jit(_write_into, donate_argnums=0)
        self._head_copy = jax.jit(_head_copy, static_argnums=1)
        self._forward = jax.jit(
            self._forward_fn, donate_argnames=("kv_caches",), static_argnames=("layout",)
        )
        self._sample = jax.jit(
            self._sample_fn,
            donate_argnames=("penalty_state", "last_tokens", "out_buf"),
            static_argnames=("layout", "mode", "out_layout"),
        )
        self._layouts: dict[tuple[int, int, bool], PackLayout] = {}
        self._signatures: dict[tuple[int, int, bool], tuple] = {}
        self._init_row = jax.jit(init_penalty_row, donate_argnames=("state",))
        self._compiled: dict[tuple[int, int, bool], jax.stages.Compiled] = {}  # forward
        # Samplers by (signature, mode): buckets whose packed inputs hold the sampling rows at
        # the same places share one (_sampler_signature).
        self._samplers: dict[tuple[tuple, SamplerMode], jax.stages.Compiled] = {}
        self.executable_cache = ExecutableCache.from_env()
        self.compile_stats: dict[str, float] = {}

    def _allocate_kv(self, num_blocks: int):
        c = self.config
        return allocate_kv_cache(
            self.backend, c.num_layers, num_blocks, self.block_size, c.num_kv_heads,
            c.head_dim, self.dtype, None if self.shardings is None else self.shardings.kv_cache,
        )  # fmt: skip

    def reallocate_kv(self, num_blocks: int) -> None:
        """Replace the pool (after profiling); compiled steps depend on its shape."""
        for k, v in self.kv_caches:
            k.delete()
            v.delete()
        self.kv_caches = self._allocate_kv(num_blocks)
        self.num_blocks = num_blocks
        self._compiled.clear()  # the samplers do not depend on the pool

    def profile_peak_bytes(self) -> int:
        """Run the largest bucket once (all padding, the sampler with every part compiled
        in) and return the device's peak bytes."""
        key = max(self.buckets.all_keys())
        mode = SamplerMode(filters=True, logprobs=True, adjust=True)  # every part compiled in
        hs = self.input_batch.prepare(*(np.zeros(0, np.int32),) * 3, key[0], key[1])
        inputs = self._put_inputs(pack(_to_inputs(hs, key[2]), self._layout(key)))
        forward = self._compile_cached(("profile", key), self._forward, *self._forward_args(key))
        name = (self._sampler_signature(key), mode)
        sampler = self._samplers.get(name) or self._compile_cached(
            name, self._sample, *self._sample_args(key, mode)
        )
        self._samplers[name] = sampler  # compile_all reuses it
        self.kv_caches, logits = forward(self.params, self.kv_caches, self.last_tokens, inputs)
        self.penalty_state, self.last_tokens, out = sampler(
            logits, self.penalty_state, self.last_tokens, inputs, *self._out_arg(key)
        )
        jax.block_until_ready(out)
        self._out_bufs.pop(key, None)  # donated
        stats = jax.local_devices()[0].memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0))

    def _compile_cached(self, name, fn, args, statics) -> jax.stages.Compiled:
        """fn lowered with args and compiled, or loaded from the executable cache."""
        cache_key = self._cache_key(name, args)
        compiled = self._load(cache_key)
        if compiled is None:
            compiled, fresh = compile_fresh(fn.lower(*args, **statics))
            if fresh:
                self._store(cache_key, compiled)
        return compiled

    # ---- the step ---------------------------------------------------------------------
    def _forward_fn(self, params, kv_caches, last_tokens, packed, *, layout):
        inputs: StepInputs = unpack(packed, layout)
        st = inputs.sampling
        # Id -1: the token its slot sampled in the previous step, not yet seen by the host.
        token_slots = st.slots[inputs.md.token_req_idx]
        token_ids = jnp.where(inputs.token_ids < 0, last_tokens[token_slots], inputs.token_ids)
        logits, kv_caches = self.model.apply(
            {"params": params}, token_ids, inputs.positions, kv_caches, inputs.md,
            inputs.logits_indices,
        )  # fmt: skip
        logits = logits.astype(jnp.float32)  # the sampler is compiled for f32 logits
        if self.shardings is not None:
            # Pin the layouts: the pool stays split (so donation is in place) and the logits
            # are replicated, as the sampler executable takes them.
            kv_caches = jax.lax.with_sharding_constraint(kv_caches, self.shardings.kv_cache)
            logits = jax.lax.with_sharding_constraint(logits, self.shardings.replicated)
        return kv_caches, logits

    def _sample_fn(
        self, logits, penalty_state, last_tokens, packed, out_buf=None, *, layout, mode,
        out_layout=None,
    ):  # fmt: skip
        st = unpack(packed, layout).sampling
        out, penalty_state = sample(logits, st, penalty_state, mode)
        # Real rows have distinct slots; padding rows all write the spare slot.
        last_tokens = last_tokens.at[st.slots].set(
            jnp.where(st.sample_mask, out.sampled, last_tokens[st.slots])
        )
        if self.shardings is not None:
            # What the host fetches is replicated (every process can read it).
            penalty_state, last_tokens, out = jax.lax.with_sharding_constraint(
                (penalty_state, last_tokens, out), self.shardings.replicated
            )
        if out_buf is not None:
            out = _write_into(out_buf, pack_traced(out, out_layout))
        return penalty_state, last_tokens, out

    def _layout(self, key: tuple[int, int, bool]) -> PackLayout:
        """How bucket `key`'s StepInputs are packed into one int32 buffer."""
        if key not in self._layouts:
            empty = np.zeros(0, np.int32)
            hs = self.input_batch.prepare(empty, empty, empty, key[0], key[1])
            self._layouts[key] = PackLayout.of(_to_inputs(hs, key[2]))
        return self._layouts[key]

    def _packed_shape(self, key: tuple[int, int, bool]) -> jax.ShapeDtypeStruct:
        size = self._layout(key).size
        return jax.ShapeDtypeStruct((size,), np.int32, sharding=self._input_sharding())

    def _forward_args(self, key: tuple[int, int, bool]) -> tuple[tuple, dict]:
        """(arguments, static arguments) to lower bucket `key`'s forward with."""
        args = (self.params, self.kv_caches, self.last_tokens, self._packed_shape(key))
        return args, {"layout": self._layout(key)}

    def _sample_args(self, key: tuple[int, int, bool], mode: SamplerMode) -> tuple[tuple, dict]:
        """(arguments, static arguments) to lower bucket `key`'s sampler in `mode` with."""
        r, v = key[1], self.config.vocab_size
        logits = jax.ShapeDtypeStruct((r, v), jnp.float32, sharding=self._input_sharding())
        args = (logits, self.penalty_state, self.last_tokens, self._packed_shape(key))
        out_layout = None
        if self.stable_buffers:
            out_layout = _out_layout(r)
            args += (jax.ShapeDtypeStruct((out_layout.size,), np.int32),)
        return args, {"layout": self._layout(key), "mode": mode, "out_layout": out_layout}

    def _sampler_signature(self, key: tuple[int, int, bool]) -> tuple:
        """What bucket `key`'s sampler depends on besides the mode: the packed buffer's size
        and the (offset, shape, dtype) of each sampling leaf in it. Buckets of one signature
        share a sampler executable (decode and mixed buckets of the same rows often do)."""
        sig = self._signatures.get(key)
        if sig is None:
            layout = self._layout(key)
            specs = zip(leaf_offsets(layout), layout.specs, strict=True)
            entries = [(off, shape, str(dt)) for off, (shape, dt) in specs]
            sampling = jax.tree.unflatten(layout.treedef, entries).sampling
            fields = tuple(getattr(sampling, f.name) for f in dataclasses.fields(sampling))
            sig = self._signatures[key] = ("sampler", layout.size, fields)
        return sig

    def _executables(self) -> dict:
        """Every executable compile_all makes that is not made yet: name -> (jit,
        arguments, static arguments). A name is a bucket key (its forward) or (sampler
        signature, SamplerMode)."""
        out = {}
        for key in self.buckets.all_keys():
            out[key] = (self._forward, *self._forward_args(key))
            for mode in ALL_MODES:
                name = (self._sampler_signature(key), mode)
                if name not in self._samplers and name not in out:
                    out[name] = (self._sample, *self._sample_args(key, mode))
        return out

    def _out_arg(self, key: tuple[int, int, bool]) -> tuple:
        """() or (this bucket's persistent output buffer,), made on first use."""
        if not self.stable_buffers:
            return ()
        if key not in self._out_bufs:
            self._out_bufs[key] = self._device_zeros(_out_layout(key[1]).size)
        return (self._out_bufs[key],)

    @staticmethod
    def _device_zeros(size: int) -> jax.Array:
        """int32 zeros committed to the device, as the step's outputs are: the small jits'
        compiled versions are cached per argument commitment, so warm-up must match."""
        return jax.device_put(np.zeros(size, np.int32), jax.devices()[0])

    def _warm_stable_buffers(self, keys) -> None:
        """Make every bucket's persistent buffers and compile the small jits that stage and
        copy them (they would otherwise compile on a bucket's first step)."""
        for key in keys:
            size = self._layout(key).size
            self._stage_inputs(key, np.zeros(size, np.int32))
            (out_buf,) = self._out_arg(key)
            for num_leaves in (1, 5):
                self._head_copy(out_buf, leading_words(_out_layout(key[1]), num_leaves))

    def _stage_inputs(self, key: tuple[int, int, bool], packed: np.ndarray) -> jax.Array:
        """The packed inputs on the device; with stable_buffers, written into the bucket's
        persistent input buffer (donated, so the result keeps its address)."""
        if not self.stable_buffers:
            return self._put_inputs(packed)
        buf = self._in_bufs.get(key)
        if buf is None:
            buf = self._device_zeros(packed.size)
        self._in_bufs[key] = self._stage(buf, packed)
        return self._in_bufs[key]

    def _cache_key(self, name, args) -> str | None:
        if self.executable_cache is None:
            return None
        flags = (os.environ.get("XLA_FLAGS", ""),
                 sorted((k, repr(v)) for k, v in jax.config.values.items()))  # fmt: skip
        if isinstance(name[-1], SamplerMode):
            # A sampler depends on its signature, mode and argument shapes only (in args):
            # the same key for every bucket, pool and model that would compile it alike,
            # so XLA's own cache never serves it unstored (only fresh compiles are stored).
            parts = (name, *flags)
        else:
            parts = (self.config, describe_backend(self.backend), self.dtype, self.block_size,
                     self.max_model_len, self.buckets, name, *flags)  # fmt: skip
        description = "\n".join(map(str, parts))
        return self.executable_cache.key(description, args)

    def _load(self, cache_key: str | None) -> jax.stages.Compiled | None:
        if cache_key is None:
            return None
        devices = [jax.devices()[0]] if self.shardings is None else self.shardings.mesh.devices
        return self.executable_cache.load(cache_key, list(np.ravel(devices)))

    def _store(self, cache_key: str | None, compiled) -> None:
        if cache_key is not None:
            self.executable_cache.store(cache_key, compiled)

    def compile_all(self, show_progress: bool = True) -> float:
        """Compile every bucket's forward and samplers; returns seconds taken. Those in the
        executable cache are loaded; the others are traced in sequence (Flax is not
        thread-safe), each handed to a pool of compiling threads as soon as it is traced (XLA
        compiles without the GIL, so tracing and compiling overlap), then stored."""
        start = time.perf_counter()
        todo_all = self._executables()
        names = list(todo_all)
        cache_keys = {name: self._cache_key(name, todo_all[name][1]) for name in names}
        workers = max(2, (os.cpu_count() or 4) // 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = pool.map(lambda n: self._load(cache_keys[n]), names)
            loaded = dict(zip(names, found, strict=True))
        # The largest forwards first: they take longest to compile, so start them earliest.
        todo = sorted(
            (name for name in names if loaded[name] is None),
            key=lambda n: (isinstance(n[-1], SamplerMode), -n[0] if isinstance(n[0], int) else 0),
        )
        compiled = {n: v for n, v in loaded.items() if v is not None}
        loaded_s = time.perf_counter() - start
        bar = tqdm(total=len(todo), desc="Compiling step buckets", disable=not show_progress)
        fresh, futures = {}, {}
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for name in todo:
                fn, args, statics = todo_all[name]
                futures[name] = pool.submit(compile_fresh, fn.lower(*args, **statics))
                futures[name].add_done_callback(lambda _: bar.update(1))
            traced_s = time.perf_counter() - start - loaded_s
            for name, fut in futures.items():
                compiled[name], fresh[name] = fut.result()
        finally:  # a failed trace or compile: drop the compiles not started yet
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        # Tracing competes with the compiling threads for the CPU, so trace_s is the time
        # to trace everything while compiling; compile_tail_s, the compiling left after.
        compile_tail_s = time.perf_counter() - start - loaded_s - traced_s
        for name in todo:
            if fresh[name]:
                self._store(cache_keys[name], compiled[name])
        for name, exe in compiled.items():
            if isinstance(name[-1], SamplerMode):
                self._samplers[name] = exe
            else:
                self._compiled[name] = exe
        keys = self.buckets.all_keys()
        if self.stable_buffers:
            self._warm_stable_buffers(keys)
        self._init_row_compiled = self._init_row.lower(
            self.penalty_state, np.int32(0), np.zeros(self.max_model_len, np.int32), np.int32(0)
        ).compile()
        warm_up_s = self.warm_up() if self.warm_up_steps else 0.0
        total = time.perf_counter() - start
        self.compile_stats = {
            "buckets": len(keys), "executables": len(names),
            "buckets_loaded": sum(loaded[k] is not None for k in keys),
            "buckets_compiled": sum(loaded[k] is None for k in keys),
            "executables_loaded": len(names) - len(todo), "executables_compiled": len(todo),
            "load_s": loaded_s, "trace_s": traced_s, "compile_tail_s": compile_tail_s,
            "warm_up_s": warm_up_s, "total_s": total,
        }  # fmt: skip
        logger.info("step buckets: %s", self.compile_stats)
        return total

    def warm_up(self) -> float:
        """Run every compiled executable once, on all-padding steps; returns seconds taken.

        An executable's first run pays one-time costs (loading its kernels, recording its
        CUDA graphs, cuBLAS set-up) that would otherwise land in the first requests' steps,
        as vLLM's start-up warm-up and graph capture avoid. A padding step changes no state a
        request can see: its tokens' slots are the null block's, its rows the spare slot
        of the penalty state and last tokens, and it samples nothing."""
        start = time.perf_counter()
        empty = np.zeros(0, np.int32)
        warmed: set = set()
        for key in self.buckets.all_keys():
            hs = self.input_batch.prepare(empty, empty, empty, key[0], key[1])
            inputs = self._stage_inputs(key, pack(_to_inputs(hs, key[2]), self._layout(key)))
            self.kv_caches, logits = self._compiled[key](
                self.params, self.kv_caches, self.last_tokens, inputs
            )
            signature = self._sampler_signature(key)
            for mode in ALL_MODES:
                if (signature, mode) in warmed:
                    continue
                warmed.add((signature, mode))
                self.penalty_state, self.last_tokens, out = self._samplers[signature, mode](
                    logits, self.penalty_state, self.last_tokens, inputs, *self._out_arg(key)
                )
                if self.stable_buffers:
                    self._out_bufs[key] = out
            jax.block_until_ready(self.kv_caches)
        jax.block_until_ready((self.penalty_state, self.last_tokens))
        return time.perf_counter() - start

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    # ---- scheduler diffs --------------------------------------------------------------
    def _apply_diffs(self, so: SchedulerOutput) -> dict[str, int]:
        """Update the persistent batch; returns req_id -> num_computed_tokens (step start)."""
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            batch.remove(req_id)
        starts = {}
        for new in so.scheduled_new_reqs:
            slot = batch.add(new)
            starts[new.req_id] = new.num_computed_tokens
            if new.sampling_params.has_penalties:
                self._init_penalties(slot, new.token_ids, new.num_prompt_tokens)
        cached = so.scheduled_cached_reqs
        for req_id, blocks, start in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
        ):
            if blocks:
                batch.append_blocks(batch.slot_of[req_id], blocks)
            starts[req_id] = start
        return starts

    def _init_penalties(self, slot: int, token_ids: list[int], num_prompt: int) -> None:
        padded = np.full(self.max_model_len, -1, np.int32)
        padded[: len(token_ids)] = token_ids

        def init_row():
            try:
                self.penalty_state = self._init_row_compiled(
                    self.penalty_state, np.int32(slot), padded, np.int32(num_prompt)
                )
            except Exception as e:  # raised again by the next step (_run_step)
                self._launch_error = e
                raise

        self._launch(init_row)

    def _launch(self, fn) -> Future:
        """Run fn, which calls an executable on the device state, on the launcher thread
        (in submission order), or here without one. The state arrays (KV pool, penalty
        state, last_tokens, stable buffers) are only touched by launched functions while
        the engine runs."""
        if self._launcher is None:
            future = Future()
            future.set_result(fn())
            return future
        return self._launcher.submit(fn)

    # ---- execute ----------------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(so))

    def dispatch(self, so: SchedulerOutput) -> StepHandle:
        """Apply the step's diffs and enqueue its device work; returns without waiting."""
        starts = self._apply_diffs(so)
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            return StepHandle(req_ids=[])
        batch = self.input_batch
        slots = np.fromiter((batch.slot_of[r] for r in req_ids), np.int32, len(req_ids))
        counts = np.fromiter(so.num_scheduled_tokens.values(), np.int32, len(req_ids))
        start_arr = np.fromiter((starts[r] for r in req_ids), np.int32, len(req_ids))
        key = self.buckets.select(int(counts.sum()), len(req_ids), bool((counts == 1).all()))
        hs = batch.prepare(slots, start_arr, counts, key[0], key[1])
        wants_logprobs = batch.logprobs[slots] >= 0
        want_lp = bool(wants_logprobs.any())
        sp = hs.sampling
        rows = sp["sample_mask"]  # rows mid-prefill sample nothing: their settings don't count
        mode = SamplerMode.for_rows({k: sp[k][rows] for k in MODE_FIELDS}, want_lp,
                                    self.config.vocab_size).compiled()  # fmt: skip
        packed = pack(_to_inputs(hs, key[2]), self._layout(key))
        out = self._launch(lambda: self._run_step(key, mode, packed))
        sample_mask = hs.sampling["sample_mask"][: len(req_ids)]
        batch.num_pending[slots[sample_mask]] += 1
        return StepHandle(
            req_ids=req_ids, slots=slots, gens=batch.slot_gen[slots].copy(),
            sample_mask=sample_mask, wants_logprobs=wants_logprobs, out=out, num_rows=key[1],
        )  # fmt: skip

    def _run_step(self, key: tuple[int, int, bool], mode: SamplerMode, packed: np.ndarray):
        """Enqueue bucket `key`'s step on the device state; returns what the host fetches."""
        if self._launch_error is not None:
            raise RuntimeError("resetting a slot's penalty state failed") from self._launch_error
        inputs = self._stage_inputs(key, packed)
        self.kv_caches, logits = self._compiled[key](
            self.params, self.kv_caches, self.last_tokens, inputs
        )
        sampler = self._samplers[self._sampler_signature(key), mode]
        self.penalty_state, self.last_tokens, out = sampler(
            logits, self.penalty_state, self.last_tokens, inputs, *self._out_arg(key)
        )
        if self.stable_buffers:
            self._out_bufs[key] = out
            n = leading_words(_out_layout(key[1]), 5 if mode.logprobs else 1)
            out = self._head_copy(out, n)
        fetched = (out,) if self.stable_buffers else _fetched(out, mode.logprobs)
        for a in fetched:
            a.copy_to_host_async()  # lands as soon as the step ends
        return fetched

    def collect(self, h: StepHandle) -> ModelRunnerOutput:
        """Wait for a dispatched step and read its sampled tokens (and logprobs)."""
        if not h.req_ids:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        want_lp = bool(h.wants_logprobs.any())
        fetched = jax.device_get(h.out.result())
        if self.stable_buffers:
            layout = _out_layout(h.num_rows)
            leaves = unpack_host(fetched[0], layout)  # all of them, or just `sampled`
            host = (
                _fetched(jax.tree.unflatten(layout.treedef, leaves), True)
                if want_lp
                else (leaves[0],)
            )
        else:
            host = fetched
        n = len(h.req_ids)
        sampled = np.asarray(host[0][:n])
        mask = h.sample_mask
        pairs = zip(sampled.tolist(), mask.tolist(), strict=True)
        sampled_ids = [[tok] if m else [] for tok, m in pairs]
        logprobs: dict[str, LogprobsLists] = {}
        if want_lp:
            # Logprobs even for a slot freed meanwhile: a request preempted while its token
            # was in flight keeps that token (the scheduler appends it), so it needs them too.
            for i in np.flatnonzero(mask & h.wants_logprobs).tolist():
                top_ids, top_lp, lp, rank = (a[i] for a in host[1:])
                logprobs[h.req_ids[i]] = LogprobsLists(
                    token_ids=[[int(sampled[i]), *top_ids.tolist()]],
                    logprobs=[[float(lp), *top_lp.tolist()]],
                    ranks=[int(rank)],
                )
        # Slots freed (and maybe reused) while the step ran take no token.
        batch = self.input_batch
        live = mask & (batch.slot_gen[h.slots] == h.gens)
        slots = h.slots[live]
        batch.num_pending[slots] -= 1
        batch.append_tokens(slots, sampled[live])
        return ModelRunnerOutput(
            req_ids=h.req_ids, sampled_token_ids=sampled_ids, logprobs=logprobs
        )

    def _input_sharding(self):
        return None if self.shardings is None else self.shardings.replicated

    def _put_inputs(self, inputs: np.ndarray) -> jax.Array:
        if self.shardings is None:
            return jax.device_put(inputs)
        return self.shardings.put_replicated(inputs)
