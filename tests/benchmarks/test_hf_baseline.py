"""The HF baseline of benchmarks/e2e_gpu.py: its inputs and one tiny run on CPU."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import e2e_gpu  # noqa: E402


def test_prompts_never_hold_the_pad_id_and_come_with_an_all_ones_mask():
    """A small vocabulary makes a pad id in 64 x 256 uniform draws all but certain."""
    ids, mask = e2e_gpu.hf_inputs(vocab_size=8, batch=64, n_in=256, seed=0)
    assert ids.shape == mask.shape == (64, 256)
    assert not (ids == e2e_gpu.HF_PAD_TOKEN).any() and ids.max() < 8
    assert bool((mask == 1).all())
    again, _ = e2e_gpu.hf_inputs(vocab_size=8, batch=64, n_in=256, seed=0)
    assert torch.equal(ids, again)  # seeded
    other, _ = e2e_gpu.hf_inputs(vocab_size=8, batch=64, n_in=256, seed=1)
    assert not torch.equal(ids, other)


def test_the_inferred_mask_case_holds_one_pad_id_and_passes_no_mask():
    ids, mask = e2e_gpu.hf_inputs(vocab_size=1000, batch=4, n_in=32, seed=0, pad_in_prompt=True)
    assert mask is None and int((ids == e2e_gpu.HF_PAD_TOKEN).sum()) == 1


def test_generate_gets_the_mask_and_both_cases_are_timed(monkeypatch):
    """A tiny Qwen3 on CPU: the baseline's calls pass an all-ones mask, the inferred case none."""
    import transformers

    seen, prompts = [], []
    real = transformers.GenerationMixin.generate

    def spy(self, ids, attention_mask=None, **kw):
        seen.append(None if attention_mask is None else int(attention_mask.min()))
        prompts.append(ids.clone())
        return real(self, ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    res = e2e_gpu.part_hf("qwen3-0.6b", smoke=True, cases=["b_batch128"], inferred_mask=("b",))
    assert sorted(res) == ["b_batch128", "b_batch128_inferred_mask", "d_ctx512"]
    assert res["b_batch128"]["attention_mask"] == "ones"
    assert res["b_batch128_inferred_mask"]["attention_mask"] == "inferred"
    assert all(r["output_tokens_per_s"] > 0 for r in res.values())
    # Two calls (warm-up, timed) per case: b with a mask of ones, b with none, d with ones.
    assert seen == [1, 1, None, None, 1, 1]
    # b's two cases share their prompts but for the one pad id.
    assert int((prompts[0] != prompts[2]).sum()) == 1 and not (prompts[0] == 0).any()
