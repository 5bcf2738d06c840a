"""On-device sampler: distributions (chi-square), greedy equivalences, exact penalties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxpaged.runner.sampler import (
    ALL_MODES,
    MODE_FIELDS,
    PenaltyState,
    SamplerMode,
    SamplingTensors,
    apply_penalties,
    init_penalty_row,
    sample,
)
from jaxpaged.sampling_params import MAX_LOGPROBS

V = 24
NB = 4


def _tensors(r, **kw):
    base = dict(
        temperature=np.ones(r, np.float32),
        top_k=np.zeros(r, np.int32),
        top_p=np.ones(r, np.float32),
        min_p=np.zeros(r, np.float32),
        presence_penalty=np.zeros(r, np.float32),
        frequency_penalty=np.zeros(r, np.float32),
        repetition_penalty=np.ones(r, np.float32),
        seeds=np.full(r, 1234, np.uint32),
        positions=np.arange(r, dtype=np.int32),
        bias_ids=np.full((r, NB), V, np.int32),
        bias_vals=np.zeros((r, NB), np.float32),
        slots=np.zeros(r, np.int32),
        sample_mask=np.ones(r, bool),
    )
    for k, v in kw.items():
        base[k] = np.broadcast_to(np.asarray(v, base[k].dtype), base[k].shape).copy()
    return SamplingTensors(**base)


def _state(slots=2):
    return PenaltyState(jnp.zeros((slots, V), jnp.int32), jnp.zeros((slots, V), bool))


_sample_jit = jax.jit(sample, static_argnames="mode")


def _sample(logits, st, state, want_logprobs):
    """The sampler in the mode the runner picks for these rows."""
    mode = SamplerMode.for_rows(_rows(st), bool(want_logprobs), V)
    return _sample_jit(logits, st, state, mode=mode)


def _rows(st):
    return {k: np.asarray(getattr(st, k)) for k in MODE_FIELDS}


def _draw(logits_row, n, **kw):
    logits = jnp.asarray(np.broadcast_to(logits_row, (n, V)))
    out, _ = _sample(logits, _tensors(n, **kw), _state(), False)
    return np.asarray(out.sampled)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """numpy restatement of vLLM's order: temperature, min_p, top_k, top_p."""
    x = logits.astype(np.float64) / temperature
    p = _softmax(x)
    keep = p >= min_p * p.max()
    order = np.argsort(-x, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    p_k = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    cum = np.cumsum(p_k[order]) - p_k[order]
    keep[order[cum >= top_p]] = False
    q = np.where(keep, p, 0)
    return q / q.sum()


LOGITS = np.random.default_rng(0).normal(size=V).astype(np.float32) * 1.5


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.3, top_p=0.7),
        dict(temperature=1.0, min_p=0.15),
        dict(temperature=0.9, top_k=5),
        dict(temperature=1.0, top_k=8, top_p=0.8, min_p=0.05),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_sample_frequencies_match_distribution(kw):
    n = 20000
    draws = _draw(LOGITS, n, **kw)
    expected = _expected(LOGITS, **kw)
    counts = np.bincount(draws, minlength=V)
    assert counts[expected == 0].sum() == 0, "sampled a token the filters removed"
    support = expected > 0
    exp_counts = expected[support].astype(np.float64) / expected[support].sum() * n
    chi2, p = stats.chisquare(counts[support], exp_counts)
    assert p > 1e-3, f"chi2={chi2:.1f} p={p:.2e}"


def test_top_k_one_equals_greedy():
    logits = np.random.default_rng(1).normal(size=(64, V)).astype(np.float32)
    st = _tensors(64, top_k=1, temperature=0.8)
    out, _ = _sample(jnp.asarray(logits), st, _state(), False)
    np.testing.assert_array_equal(np.asarray(out.sampled), logits.argmax(-1))
    greedy, _ = _sample(jnp.asarray(logits), _tensors(64, temperature=0.0), _state(), False)
    np.testing.assert_array_equal(np.asarray(greedy.sampled), logits.argmax(-1))


def test_same_seed_and_position_same_sample_anywhere_in_batch():
    logits = np.tile(LOGITS, (16, 1))
    seeds = np.arange(16, dtype=np.uint32)
    positions = np.arange(16, dtype=np.int32) * 7
    out, _ = _sample(jnp.asarray(logits), _tensors(16, seeds=seeds, positions=positions),
                     _state(), False)  # fmt: skip
    perm = np.random.default_rng(2).permutation(16)
    out_p, _ = _sample(
        jnp.asarray(logits[perm]), _tensors(16, seeds=seeds[perm], positions=positions[perm]),
        _state(), False,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.sampled)[perm], np.asarray(out_p.sampled))
    one = _tensors(1, seeds=seeds[3:4], positions=positions[3:4])
    alone, _ = _sample(jnp.asarray(logits[3:4]), one, _state(), False)
    assert int(alone.sampled[0]) == int(out.sampled[3])


def test_apply_penalties_exact():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, V)).astype(np.float32) * 3
    counts = rng.integers(0, 3, size=(3, V)).astype(np.int32)
    prompt = rng.random((3, V)) < 0.3
    pres = np.array([0.0, 0.5, -0.3], np.float32)
    freq = np.array([0.2, 0.0, 1.1], np.float32)
    rep = np.array([1.0, 1.3, 0.7], np.float32)
    got = np.asarray(apply_penalties(jnp.asarray(logits), counts, prompt, pres, freq, rep))
    want = logits.copy()
    for i in range(3):
        for t in range(V):
            if counts[i, t] > 0 or prompt[i, t]:
                want[i, t] = want[i, t] / rep[i] if want[i, t] > 0 else want[i, t] * rep[i]
            want[i, t] -= freq[i] * counts[i, t]
            want[i, t] -= pres[i] * (counts[i, t] > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_penalty_state_counts_outputs_and_steers_greedy():
    # Slot 1 holds a request whose prompt is [5, 6] and output so far [7, 7].
    state = init_penalty_row(_state(3), jnp.int32(1), jnp.array([5, 6, 7, 7, -1, -1]), 2)
    np.testing.assert_array_equal(np.asarray(state.output_counts[1])[[5, 6, 7]], [0, 0, 2])
    assert np.asarray(state.prompt_mask[1])[[5, 6, 7]].tolist() == [True, True, False]
    logits = np.zeros((1, V), np.float32)
    logits[0, 7] = 1.0  # token 7 best unless penalised
    st = _tensors(1, temperature=0.0, frequency_penalty=1.0, slots=1)
    out, new_state = _sample(jnp.asarray(logits), st, state, False)
    assert int(out.sampled[0]) != 7
    assert int(new_state.output_counts[1, int(out.sampled[0])]) == 1


def test_logit_bias_and_suppression():
    logits = np.tile(LOGITS, (2, 1))
    best = int(LOGITS.argmax())
    ids = np.full((2, NB), V, np.int32)
    vals = np.zeros((2, NB), np.float32)
    ids[0, 0], vals[0, 0] = 3, 100.0  # force token 3
    ids[1, 0], vals[1, 0] = best, -np.inf  # suppress the best token
    st = _tensors(2, temperature=0.0, bias_ids=ids, bias_vals=vals)
    out, _ = _sample(jnp.asarray(logits), st, _state(), False)
    assert int(out.sampled[0]) == 3
    assert int(out.sampled[1]) == int(np.argsort(-LOGITS)[1])


def test_logprobs_are_raw_log_softmax_with_rank():
    logits = np.random.default_rng(4).normal(size=(2, V)).astype(np.float32)
    out, _ = _sample(jnp.asarray(logits), _tensors(2, temperature=1.0), _state(), True)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-lsm, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(out.top_ids), order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(lsm, order, -1),
                               rtol=1e-5)  # fmt: skip
    for i in range(2):
        tok = int(out.sampled[i])
        assert abs(float(out.sampled_logprob[i]) - lsm[i, tok]) < 1e-5
        assert int(out.sampled_rank[i]) == 1 + int((lsm[i] > lsm[i, tok]).sum())


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sampler_has_no_conditional(mode):
    # XLA:GPU runs a conditional by waiting on the host for its predicate: the sampler
    # compiles its optional parts in or out instead.
    logits = jnp.zeros((4, V), jnp.float32)
    text = _sample_jit.lower(logits, _tensors(4), _state(), mode=mode).as_text()
    assert "stablehlo.case" not in text and "stablehlo.if" not in text


def test_modes_agree_where_their_parts_are_unused():
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(8, V)).astype(np.float32))
    st = _tensors(8, temperature=np.array([0, 0.7] * 4, np.float32))
    outs = {m: _sample_jit(logits, st, _state(), mode=m) for m in ALL_MODES}
    plain = np.asarray(outs[SamplerMode()][0].sampled)
    assert (plain[::2] == np.asarray(logits).argmax(-1)[::2]).all()  # the greedy rows
    for m, (out, _) in outs.items():
        np.testing.assert_array_equal(np.asarray(out.sampled), plain, err_msg=str(m))
    assert np.asarray(outs[SamplerMode()][0].top_ids).max() == 0  # not computed
    assert np.asarray(outs[SamplerMode(logprobs=True, adjust=True)][0].top_ids).max() > 0
    # Token counts are only kept up to date in adjust mode (the only mode that reads them).
    assert np.asarray(outs[SamplerMode()][1].output_counts).sum() == 0
    assert np.asarray(outs[SamplerMode(adjust=True)][1].output_counts).sum() == 8


def test_greedy_rows_ignore_filters():
    # One argmax serves greedy and sampled rows: a greedy row's filters keep its top token.
    logits = np.random.default_rng(8).normal(size=(6, V)).astype(np.float32)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins
    st = _tensors(6, temperature=0.0, top_k=2, top_p=0.3, min_p=0.5)
    out, _ = _sample(jnp.asarray(logits), st, _state(), False)
    np.testing.assert_array_equal(np.asarray(out.sampled), logits.argmax(-1))


def test_mode_for_rows():
    off = dict(top_k=np.zeros(3, np.int32), top_p=np.ones(3), min_p=np.zeros(3),
               presence_penalty=np.zeros(3), frequency_penalty=np.zeros(3),
               repetition_penalty=np.ones(3), bias_ids=np.full((3, NB), V))  # fmt: skip
    assert SamplerMode.for_rows(off, want_logprobs=False, vocab_size=V) == SamplerMode()
    for name, value, mode in (
        ("top_k", 5, SamplerMode(True, True)),
        ("top_p", 0.9, SamplerMode(True, True)),
        ("min_p", 0.1, SamplerMode(True, True)),
        ("presence_penalty", 0.5, SamplerMode(logprobs=True, adjust=True)),
        ("frequency_penalty", -0.5, SamplerMode(logprobs=True, adjust=True)),
        ("repetition_penalty", 1.2, SamplerMode(logprobs=True, adjust=True)),
        ("bias_ids", 3, SamplerMode(logprobs=True, adjust=True)),
    ):
        rows = {k: v.copy() for k, v in off.items()}
        rows[name][1] = value
        assert SamplerMode.for_rows(rows, want_logprobs=True, vocab_size=V) == mode, name


def test_uncompiled_modes_run_as_their_adjust_superset():
    assert SamplerMode().compiled() == SamplerMode()
    assert SamplerMode(filters=True).compiled() == SamplerMode(filters=True)
    assert SamplerMode(logprobs=True).compiled() == SamplerMode(logprobs=True, adjust=True)
    for f, lp, adj in itertools.product((False, True), repeat=3):
        mode = SamplerMode(f, lp, adj).compiled()
        assert mode in ALL_MODES and mode.filters == f and mode.logprobs == lp
        assert mode.adjust or not adj
