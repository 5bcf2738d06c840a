"""The offline engine end to end on CPU (reference attention backend), against transformers.

One tiny random Llama checkpoint; LLM instances share shapes, so the session's compilation
cache compiles each bucket once.
"""

from __future__ import annotations

import contextlib
import json
import threading

import jax
import numpy as np
import pytest
import torch
import transformers as tf

from jaxpaged.llm import LLM
from jaxpaged.runner.sampler import ALL_MODES
from jaxpaged.sampling_params import SamplingParams

VOCAB = 256
MAX_LEN = 256


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=MAX_LEN)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(path), safe_serialization=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return str(path), model


def _llm(path, **kw):
    args = dict(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=8,
                max_num_batched_tokens=32, num_kv_blocks=40, show_progress=False)  # fmt: skip
    args.update(kw)
    return LLM(path, **args)


@pytest.fixture(scope="module")
def tight_llm(hf_model_dir):
    """A 32-token budget forces chunked prefill; 17 usable blocks (one max_model_len
    sequence) for up to 8 running requests force preemption."""
    return _llm(hf_model_dir[0], num_kv_blocks=18)


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _prompts(seed, lengths, prefix=()):
    rng = np.random.default_rng(seed)
    return [list(prefix) + rng.integers(0, VOCAB, n).tolist() for n in lengths]


LENGTHS = [3, 70, 12, 41, 5, 96, 27, 8, 60, 15, 33, 2, 80, 19, 50, 9]


def test_mixed_batch_with_chunked_prefill_and_preemption_matches_transformers(
    tight_llm, hf_model_dir
):
    prompts = _prompts(0, LENGTHS)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    before = tight_llm.engine.get_stats().scheduler.num_preemptions_total
    outs = tight_llm.generate(prompts, params, use_tqdm=False)
    stats = tight_llm.engine.get_stats().scheduler
    assert stats.num_preemptions_total > before, "the pool was meant to force preemption"
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == _hf_greedy(hf_model_dir[1], prompt, 24)
    assert stats.num_free_blocks == tight_llm.config.cache.num_blocks - 1


def test_shared_system_prompt_hits_prefix_cache(hf_model_dir):
    llm = _llm(hf_model_dir[0], num_kv_blocks=80)
    system = np.random.default_rng(5).integers(0, VOCAB, 100).tolist()
    prompts = _prompts(1, [4, 9, 17, 6, 30, 11, 3, 22], prefix=system)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.get_stats().scheduler
    assert stats.prefix_cache_hits_total > 0
    print("prefix cache hit rate", stats.prefix_cache_hits_total / stats.prefix_cache_queries_total)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(hf_model_dir[1], prompt, 12)
    assert sum(o.num_cached_tokens for o in outs) > 0


def test_seeded_sample_independent_of_batch(tight_llm):
    prompts = _prompts(2, [10, 33, 4, 57, 21, 8, 45, 13, 6, 29, 17, 38, 3, 25, 11, 19])
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=16,
                            ignore_eos=True)  # fmt: skip
    crowd = tight_llm.generate(prompts, params, use_tqdm=False)
    alone = tight_llm.generate([prompts[3]], params, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == crowd[3].outputs[0].token_ids
    # Different seeds really sample differently (the test above could not pass vacuously).
    other = tight_llm.generate(
        [prompts[3]],
        SamplingParams(temperature=0.9, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_buckets_with_the_sampling_rows_at_the_same_places_share_a_sampler(tight_llm):
    """The sampler reads only the sampling rows of the packed inputs, so buckets whose
    buffers agree on them share one executable per mode (the HF comparisons above run
    decode and mixed steps through the shared ones)."""
    runner = tight_llm.model_runner
    sigs = {k: runner._sampler_signature(k) for k in runner.buckets.all_keys()}
    assert len(set(sigs.values())) < len(sigs), "this bucket set was meant to share"
    assert len(runner._samplers) == len(ALL_MODES) * len(set(sigs.values()))
    for key, sig in sigs.items():
        assert sig[1] == runner._layout(key).size and sig[2][0][1] == (key[1],)


def test_runner_compiles_in_the_filters_a_batch_needs(tight_llm):
    """top_k=1 at temperature 1 is greedy only if the step's sampler sorts: the runner must
    pick the filtering mode whenever some row of the batch filters, next to plain rows."""
    prompts = _prompts(4, [9, 30, 5, 44])
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = tight_llm.generate(prompts, greedy, use_tqdm=False)
    params = [SamplingParams(temperature=1.0, top_k=1, seed=i, max_tokens=16, ignore_eos=True)
              if i % 2 == 0 else SamplingParams(temperature=1.0, seed=i, max_tokens=16,
                                                ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    got = tight_llm.generate(prompts, params, use_tqdm=False)
    for i in (0, 2):
        assert got[i].outputs[0].token_ids == want[i].outputs[0].token_ids
    # The plain rows sampled (the check above could not pass with every row greedy).
    assert any(got[i].outputs[0].token_ids != want[i].outputs[0].token_ids for i in (1, 3))


def test_n_fans_out_and_logprobs(tight_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2,
                            ignore_eos=True)  # fmt: skip
    (out,) = tight_llm.generate([_prompts(3, [40])[0]], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.token_ids) == 8 and len(c.logprobs) == 8
        for tok, lp in zip(c.token_ids, c.logprobs, strict=True):
            assert tok in lp and len(lp) >= 2
            assert lp[tok].logprob <= 0


def test_requests_that_cannot_fit_are_rejected(tight_llm):
    with pytest.raises(ValueError, match=r"maximum context length is 256 tokens.*250 in the"):
        tight_llm.generate([[1] * 250], SamplingParams(max_tokens=10), use_tqdm=False)
    assert not tight_llm.engine.has_unfinished_requests()


def test_pool_smaller_than_one_sequence_fails_at_start(hf_model_dir):
    with pytest.raises(ValueError, match=r"9 usable blocks.*max_model_len=256 .*16 blocks"):
        _llm(hf_model_dir[0], num_kv_blocks=10)


@contextlib.contextmanager
def _backend_compiles():
    """The list of backend compilations made inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_steady_state_never_compiles(tight_llm):
    with _backend_compiles() as compiles:
        rng = np.random.default_rng(4)
        prompts = [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(1, 120, 200)]
        temps = rng.choice([0.0, 0.8], 200)
        max_tokens = rng.integers(1, 40, 200)
        params = [
            SamplingParams(
                temperature=float(temps[i]),
                max_tokens=int(max_tokens[i]),
                ignore_eos=True,
                repetition_penalty=1.2 if i % 7 == 0 else 1.0,
                logprobs=1 if i % 5 == 0 else None,
            )
            for i in range(200)
        ]
        outs = tight_llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == 200
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_kv_pool_is_updated_in_place(tight_llm):
    runner = tight_llm.model_runner
    k0, v0 = runner.kv_caches[0]
    pointers = (k0.unsafe_buffer_pointer(), v0.unsafe_buffer_pointer())
    tight_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    k1, v1 = runner.kv_caches[0]
    assert k0.is_deleted() and v0.is_deleted(), "the old pool arrays were not donated"
    assert (k1.unsafe_buffer_pointer(), v1.unsafe_buffer_pointer()) == pointers


def test_async_scheduling_gives_the_synchronous_tokens(tight_llm, hf_model_dir):
    """Async scheduling (the default) feeds each sampled token to the next step on device;
    it must not change a single token or logprob, including requests that stop on a token
    while their next steps are already dispatched, preemption and chunked prefill, with one,
    two or three dispatched steps unread at scheduling time (1 is the default)."""
    sync_llm = _llm(hf_model_dir[0], num_kv_blocks=18, async_scheduling=False)
    assert tight_llm.engine.async_scheduling and not sync_llm.engine.async_scheduling
    assert tight_llm.engine.async_depth == 1
    rng = np.random.default_rng(6)
    prompts = _prompts(6, [int(n) for n in rng.integers(1, 90, 24)])
    stop_ids = [int(t) for t in rng.integers(0, VOCAB, 40)]
    params = [
        SamplingParams(
            temperature=[0.0, 0.8, 1.2][i % 3], top_p=0.9 if i % 4 == 0 else 1.0, seed=100 + i,
            max_tokens=int(rng.integers(1, 30)), min_tokens=2 if i % 5 == 0 else 0,
            stop_token_ids=stop_ids if i % 2 else [],
            repetition_penalty=1.3 if i % 6 == 0 else 1.0,
            frequency_penalty=0.5 if i % 7 == 0 else 0.0,
            logprobs=2 if i % 3 == 0 else None,
        )
        for i in range(len(prompts))
    ]  # fmt: skip
    want = sync_llm.generate(prompts, params, use_tqdm=False)
    engine = tight_llm.engine
    try:
        for depth in (1, 2, 3):
            engine.async_depth = depth
            preemptions = engine.get_stats().scheduler.num_preemptions_total
            got = tight_llm.generate(prompts, params, use_tqdm=False)
            assert engine.get_stats().scheduler.num_preemptions_total > preemptions, depth
            _assert_same_outputs(got, want)
            assert not engine._in_flight
    finally:
        engine.async_depth = 1
    stats = engine.get_stats().scheduler
    assert stats.num_free_blocks == tight_llm.config.cache.num_blocks - 1
    assert not engine.has_unfinished_requests()


def _assert_same_outputs(got, want) -> None:
    """Same tokens, finish reasons and logprobs, request by request."""
    reasons = set()
    for a, b in zip(got, want, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids, a.request_id
        assert (ca.finish_reason, ca.stop_reason) == (cb.finish_reason, cb.stop_reason)
        reasons.add(ca.finish_reason)
        if cb.logprobs is not None:
            for la, lb in zip(ca.logprobs, cb.logprobs, strict=True):
                assert la.keys() == lb.keys()
                for tok in la:
                    assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=1e-5)
    assert reasons == {"stop", "length"}, "both ways of finishing must be exercised"


def test_second_start_loads_every_bucket_from_the_executable_cache(
    hf_model_dir, tmp_path, monkeypatch
):
    # A pool size and a seq cap no other test uses: XLA's own cache (shared by the session)
    # has no entry for these forwards or samplers (the samplers do not depend on the pool),
    # so the first start compiles and stores every executable.
    monkeypatch.setenv("JAXPAGED_COMPILATION_CACHE", str(tmp_path))
    prompts = _prompts(7, [5, 40, 17])
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    first = _llm(hf_model_dir[0], num_kv_blocks=21, max_num_seqs=6)
    stats = first.model_runner.compile_stats
    assert stats["buckets_loaded"] == 0 and stats["buckets_compiled"] > 0
    want = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
    del first
    second = _llm(hf_model_dir[0], num_kv_blocks=21, max_num_seqs=6)
    runner = second.model_runner
    assert runner.compile_stats["buckets_compiled"] == 0
    assert runner.compile_stats["executables_compiled"] == 0  # the samplers too
    assert runner.compile_stats["buckets_loaded"] == stats["buckets_compiled"]
    assert runner.compile_stats["trace_s"] < stats["trace_s"]
    k0 = runner.kv_caches[0][0]
    got = [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert k0.is_deleted(), "a loaded executable must still donate the KV pool"
    # A different pool size is a different executable: nothing may be reused for it.
    third = _llm(hf_model_dir[0], num_kv_blocks=22, max_num_seqs=6)
    assert third.model_runner.compile_stats["buckets_loaded"] == 0
    # ...but the samplers, which do not depend on it, are.
    assert third.model_runner.compile_stats["executables_compiled"] == stats["buckets"]


def test_async_keeps_logprobs_of_requests_preempted_with_a_token_in_flight(tight_llm, hf_model_dir):
    """A request preempted while its sampled token is still on the device keeps that token;
    its logprobs must come with it (one entry per token, as synchronous scheduling)."""
    prompts = _prompts(0, LENGTHS)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    before = tight_llm.engine.get_stats().scheduler.num_preemptions_total
    got = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.engine.get_stats().scheduler.num_preemptions_total > before
    sync_llm = _llm(hf_model_dir[0], num_kv_blocks=18, async_scheduling=False)
    want = sync_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, want, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        assert len(ca.logprobs) == len(ca.token_ids), a.request_id
        assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-4)


def test_idle_engine_settles_the_step_in_flight_after_an_abort(tight_llm):
    engine = tight_llm.engine
    engine.add_request("idle-abort", None, [5, 6, 7], SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert len(engine._in_flight) == engine.async_depth
    engine.abort_request("idle-abort")
    assert not engine.has_unfinished_requests()
    assert not engine._in_flight and not engine.scheduler._scheduled
    engine.step()  # tells the runner to drop the slot
    assert "idle-abort" not in tight_llm.model_runner.input_batch.slot_of


def test_stable_buffers_give_the_same_outputs_at_fixed_device_addresses(tight_llm, hf_model_dir):
    """stable_buffers stages every step's inputs and outputs through persistent per-bucket
    buffers (so XLA can replay its CUDA graphs): same tokens and logprobs, and the buffers
    keep their device addresses from step to step."""
    stable = _llm(hf_model_dir[0], num_kv_blocks=18, stable_buffers=True)
    runner = stable.model_runner
    assert runner.stable_buffers and not tight_llm.model_runner.stable_buffers
    prompts = _prompts(9, [3, 70, 12, 41, 5, 96, 27, 8])
    params = [
        SamplingParams(temperature=[0.0, 0.9][i % 2], seed=7 + i, max_tokens=12 + i,
                       logprobs=3 if i % 3 == 0 else None)
        for i in range(len(prompts))
    ]  # fmt: skip
    want = tight_llm.generate(prompts, params, use_tqdm=False)
    with _backend_compiles() as compiles:
        got = stable.generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, want, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids, a.request_id
        if cb.logprobs is not None:
            for la, lb in zip(ca.logprobs, cb.logprobs, strict=True):
                assert la.keys() == lb.keys()
                for tok in la:
                    assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=1e-5)
                    assert la[tok].rank == lb[tok].rank
        else:
            assert ca.logprobs is None
    assert compiles == [], "stable buffers compiled during generate"
    used = set(runner._in_bufs)  # every bucket's, made at start-up
    assert used == set(runner._out_bufs) == set(runner._compiled)
    pointers = {k: (runner._in_bufs[k].unsafe_buffer_pointer(),
                    runner._out_bufs[k].unsafe_buffer_pointer()) for k in used}  # fmt: skip
    stable.generate(prompts, params, use_tqdm=False)
    for k in used:
        now = (runner._in_bufs[k].unsafe_buffer_pointer(),
               runner._out_bufs[k].unsafe_buffer_pointer())  # fmt: skip
        assert now == pointers[k], f"bucket {k} moved"


def test_launcher_thread_makes_every_device_call_and_changes_no_token(
    tight_llm, hf_model_dir, monkeypatch
):
    """The runner's launcher thread makes the step (and penalty-row) calls in order; without
    it (JAXPAGED_LAUNCH_THREAD=0) the calling thread makes them: same tokens either way."""
    monkeypatch.setenv("JAXPAGED_LAUNCH_THREAD", "0")
    plain = _llm(hf_model_dir[0], num_kv_blocks=18)
    runner = tight_llm.model_runner
    assert plain.model_runner._launcher is None and runner._launcher is not None
    threads = set()
    original = runner._compiled

    def recording(exe):
        def call(*args):
            threads.add(threading.current_thread().name)
            return exe(*args)

        return call

    prompts = _prompts(11, [30, 4, 65, 17, 9])
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=15, repetition_penalty=1.4,
                       frequency_penalty=0.3 if i % 2 else 0.0)
        for i in range(len(prompts))
    ]  # fmt: skip
    samplers = runner._samplers
    runner._compiled = {k: recording(v) for k, v in original.items()}
    runner._samplers = {k: recording(v) for k, v in samplers.items()}
    init_row = runner._init_row_compiled
    runner._init_row_compiled = recording(init_row)  # the penalty-row resets
    try:
        got = tight_llm.generate(prompts, params, use_tqdm=False)
    finally:
        runner._compiled, runner._init_row_compiled = original, init_row
        runner._samplers = samplers
    want = plain.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert threads and all(name.startswith("jaxpaged-launch") for name in threads), threads


def test_a_failed_penalty_reset_on_the_launcher_thread_fails_the_next_step(hf_model_dir):
    """A penalty-row reset runs on the launcher thread, where nobody waits for it: if it
    fails, the next step must raise instead of sampling with the slot's stale statistics."""
    llm = _llm(hf_model_dir[0], num_kv_blocks=18)
    runner = llm.model_runner
    assert runner._launcher is not None

    def broken(*args):
        raise ValueError("reset broke")

    runner._init_row_compiled = broken
    params = SamplingParams(max_tokens=4, repetition_penalty=1.3)
    with pytest.raises(RuntimeError, match="penalty state") as info:
        llm.generate([[3, 4, 5]], params, use_tqdm=False)
    assert isinstance(info.value.__cause__, ValueError)


def test_bench_throughput_cli_reports_what_it_generated(hf_model_dir, tmp_path):
    """`jaxpaged bench throughput` runs N random-length requests to their exact lengths and
    writes the counts the roofline needs."""
    from jaxpaged import cli

    out = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--model", hf_model_dir[0], "--dtype", "float32",
            "--num-prompts", "5", "--random-range", "3", "9", "--max-model-len", str(MAX_LEN),
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--num-kv-blocks", "40",
            "--output-json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())["result"]
    from jaxpaged.bench import make_requests

    prompts, params = make_requests(5, 0, 0, VOCAB, 0, (3, 9))
    assert res["num_requests"] == 5
    assert res["num_input_tokens"] == sum(map(len, prompts))
    assert res["num_output_tokens"] == sum(p.max_tokens for p in params)
    pairs = zip(prompts, params, strict=True)
    reads = sum(sum(len(q) + j for j in range(1, p.max_tokens)) for q, p in pairs)
    assert res["decode_kv_token_reads"] == reads
    assert res["max_output_tokens"] == max(p.max_tokens for p in params)
    assert res["output_tokens_per_s"] > 0 and res["num_buckets"] > 0


def test_warm_up_runs_every_executable_and_changes_nothing_a_request_sees(tight_llm):
    """ModelRunner.warm_up (on by default on GPU) runs every bucket's forward and every
    sampler on all-padding steps: only the null block and the spare slot may change."""
    runner = tight_llm.model_runner
    prompts = _prompts(11, [9, 30, 4])
    params = [SamplingParams(temperature=0.0, max_tokens=8, presence_penalty=0.5, logprobs=2),
              SamplingParams(temperature=0.8, seed=3, max_tokens=8, top_p=0.9),
              SamplingParams(temperature=0.0, max_tokens=8)]  # fmt: skip
    want = [o.outputs[0].token_ids for o in tight_llm.generate(prompts, params, use_tqdm=False)]
    before = jax.tree.map(np.asarray, (runner.kv_caches, runner.penalty_state, runner.last_tokens))
    calls, samplers = [], dict(runner._samplers)

    def counted(name):
        def call(*args):
            calls.append(name)
            return samplers[name](*args)

        return call

    runner._samplers.update({name: counted(name) for name in samplers})
    try:
        assert runner.warm_up() > 0
    finally:
        runner._samplers.update(samplers)
    assert sorted(map(str, calls)) == sorted(map(str, runner._samplers))  # each once
    kv, state, last = jax.tree.map(np.asarray, (runner.kv_caches, runner.penalty_state,
                                                runner.last_tokens))  # fmt: skip
    spare = runner.input_batch.max_num_seqs
    for a, b in zip(jax.tree.leaves(kv), jax.tree.leaves(before[0]), strict=True):
        np.testing.assert_array_equal(a[1:], b[1:])  # block 0 is the null block
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(before[1]), strict=True):
        np.testing.assert_array_equal(np.delete(a, spare, 0), np.delete(b, spare, 0))
    np.testing.assert_array_equal(np.delete(last, spare), np.delete(before[2], spare))
    got = [o.outputs[0].token_ids for o in tight_llm.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_start_up_heap_is_frozen_out_of_full_collections(hf_model_dir, monkeypatch):
    import gc

    monkeypatch.setenv("JAXPAGED_GC_FREEZE", "1")
    gc.unfreeze()
    try:
        llm = _llm(hf_model_dir[0])
        frozen = gc.get_freeze_count()
        # The engine, runner and model are frozen with the rest of the start-up heap.
        assert frozen > 10_000
        assert not any(o is llm.model_runner for o in gc.get_objects())  # out of reach
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        gc.unfreeze()
