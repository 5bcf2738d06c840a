"""The end-to-end report renders the table and charts from a recorded GPU run."""

import json
import os

from benchmarks import e2e_report

RECORDED = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results",
                        "e2e_h200_qwen3_async.json")  # fmt: skip


def test_report_from_a_recorded_run(tmp_path):
    with open(RECORDED) as f:
        results = json.load(f)
    written = e2e_report.render(results, str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["e2e_qwen3-0.6b_decode.png", "e2e_qwen3-0.6b_throughput.png",
                     "e2e_report.md"]  # fmt: skip
    for p in written[1:]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "e2e_report.md").read_text()
    assert "NVIDIA H200" in report and "--sync-compare" in report
    assert "4.0x HF (static batch 128)" in report  # 17,628 / 4,359 tok/s
    # Decode B128 ctx512: 10.90 ms against a floor of (1.19 GB + KV) / 3,245 GB/s.
    assert "| 10.90 | | 4.06x floor (2.68 ms)" in report


def test_report_of_the_8b_run_with_its_baselines(tmp_path):
    """The Llama-3-8B run: jaxpaged and the HF / plain-XLA baselines of the same device call."""
    with open(RECORDED.replace("e2e_h200_qwen3_async", "e2e_h200_llama3_8b_run2_merged")) as f:
        results = json.load(f)
    e2e_report.render(results, str(tmp_path))
    report = (tmp_path / "e2e_report.md").read_text()
    assert "3.3x HF (static batch 128)" in report  # 10,696 / 3,259 tok/s
    # B128 ctx512: 13.64 ms, floor (16.06 GB + 128 x 512 x 128 KiB) / 3,291 GB/s = 7.49 ms.
    assert "| 13.64 | | 1.82x floor (7.49 ms); plain XLA 17.83 ms" in report


def test_report_sets_the_other_async_depth_beside_the_run():
    """Call 7 ran (b) and the decode steps again at async depth 2 (--compare-depths 2)."""
    with open(RECORDED.replace("e2e_h200_qwen3_async", "e2e_h200_llama3_8b_run7")) as f:
        results = json.load(f)
    table = e2e_report.table(results)
    assert "| llama3-8b | (b) output tok/s (device idle 0%) | 15,033 | 5,170 | 2.9x HF" in table
    assert "(b) at async depth 2 (the run's: 1): output tok/s (device idle 0%) | 15,361 |" in table
    assert "decode step B128_ctx512 at async depth 2 (the run's: 1): ms | 8.11 |" in table
    del results["models"]["llama3-8b"]["jaxpaged"]["async_depth_2"]
    assert "async depth" not in e2e_report.table(results)


def test_throughput_roofline_and_the_hf_ratio_of_each_throughput_workload():
    """(b) on the 8B shape: 1000 x 255 token passes through 6.98 B layer parameters and 128,000
    lm_head rows, 3.69 PFLOP; at 774 TFLOP/s at least 4.77 s, so at most ~26,800 tok/s."""
    wl = {"num_requests": 1000, "num_input_tokens": 128_000, "num_output_tokens": 128_000,
          "output_tokens_per_s": 14_000.0, "device_idle_fraction": 0.0,
          "decode_kv_token_reads": 1000 * (127 * 128 + 128 * 127 // 2)}  # fmt: skip
    jp = {"layer_params": 6.98e9, "lm_head_params": 128256 * 4096, "b": wl,
          "weight_bytes": 16.06e9, "step_weight_bytes": 15.01e9, "kv_bytes_per_token": 131072,
          "engine_args": {"max_num_seqs": 256, "max_num_batched_tokens": 2048}}  # fmt: skip
    ceilings = {"matmul_TFLOPs": 774.0, "copy_GBps": 3282.0}
    bound, kind = e2e_report.throughput_roofline(jp, "b", ceilings)
    assert 26_700 < bound < 26_900 and kind == "compute"
    assert e2e_report.throughput_roofline(jp, "a", ceilings) is None  # not run
    assert e2e_report.throughput_roofline({"b": wl}, "b", ceilings) is None  # no parameters
    assert e2e_report.throughput_roofline(jp, "b", {"error": "exit 1"}) is None  # no ceilings
    no_counts = dict(jp, b={k: v for k, v in wl.items() if k != "decode_kv_token_reads"})
    assert e2e_report.throughput_roofline(no_counts, "b", ceilings)[1].startswith("compute only")
    # (c) 1000 x 1024/512 with 256 sequences a step: the decode steps read 654.08 M cached
    # tokens (85.7 TB) and the weights but the input embedding at least 2000 times (30.0 TB):
    # >= 35.3 s, so memory bounds it (compute: 21.97 PFLOP, 28.4 s) at ~14,520 tok/s.
    jp["c"] = dict(wl, num_input_tokens=1_024_000, num_output_tokens=512_000,
                   decode_kv_token_reads=1000 * (511 * 1024 + 512 * 511 // 2))  # fmt: skip
    bound, kind = e2e_report.throughput_roofline(jp, "c", ceilings)
    assert 14_450 < bound < 14_600 and kind == "memory"
    hf = {
        "b_batch128": {"output_tokens_per_s": 3_500.0},
        "c_batch128": {"output_tokens_per_s": 2_000.0},
    }
    results = {"ceilings": ceilings, "models": {"m": {"jaxpaged": jp, "hf": hf}}}
    table = e2e_report.table(results)
    assert "| m | (b) output tok/s (device idle 0%) | 14,000 | 3,500 | 4.0x HF" in table
    assert "| m | (c) output tok/s (device idle 0%) | 14,000 | 2,000 | 7.0x HF" in table
    assert "(compute-bound; jaxpaged at 52%)" in table
    assert "(memory-bound; jaxpaged at 96%)" in table
    jp["b"] = dict(wl, device_idle_upper=0.31)  # a run that has the upper bound too
    assert "| m | (b) output tok/s (device idle 0%-31%) |" in e2e_report.table(results)


def test_a_step_reads_every_weight_but_an_untied_input_embedding():
    """Runs that predate `step_weight_bytes`: an untied table (layers + 2 x head parameters)
    is left out, a tied one (layers + head: it is the lm_head) is not."""
    llama = {"layer_params": 6_979_588_096, "lm_head_params": 525_336_576,
             "weight_bytes": 16_060_522_496}  # fmt: skip
    assert e2e_report.step_weight_bytes(llama) == 16_060_522_496 - 2 * 525_336_576
    qwen = {"layer_params": 440_467_456, "lm_head_params": 155_582_464,
            "weight_bytes": 1_192_099_840}  # fmt: skip
    assert e2e_report.step_weight_bytes(qwen) == 1_192_099_840
    assert e2e_report.step_weight_bytes({"weight_bytes": 7}) == 7  # no parameter counts
    assert e2e_report.step_weight_bytes(dict(llama, step_weight_bytes=5)) == 5


def test_the_report_sets_hf_with_an_inferred_mask_beside_its_baseline():
    """--hf-inferred-mask runs HF again on the prompts with a pad id and no mask."""
    wl = {"output_tokens_per_s": 19_000.0, "device_idle_fraction": 0.0}
    hf = {"c_batch128": {"output_tokens_per_s": 4_000.0},
          "c_batch128_inferred_mask": {"output_tokens_per_s": 1_000.0}}  # fmt: skip
    results = {"ceilings": {}, "models": {"m": {"jaxpaged": {"c": wl}, "hf": hf}}}
    table = e2e_report.table(results)
    assert "| m | (c) output tok/s (device idle 0%) | 19,000 | 4,000 | 4.8x HF" in table
    assert (
        "| m | (c) HF with a pad id in the prompts and no mask (inferred) | | 1,000 | "
        "19.0x HF on this path; HF 4.00x slower than with its all-ones mask |"
    ) in table
    del hf["c_batch128_inferred_mask"]
    assert "inferred" not in e2e_report.table(results)


def test_the_memory_roofline_counts_the_steps_the_workload_needs():
    """(a) on the 8B shape, 256 requests with 100-1024 outputs (148,756 tokens, 1,021 the
    longest) and 1024 rows a step: at most 256 rows a step (581 steps), and at least 1,021
    steps, each reading the 15.01 GB of weights, beside 18.10 TB of KV."""
    wl = {"num_requests": 256, "num_input_tokens": 148_894, "num_output_tokens": 148_756,
          "output_tokens_per_s": 9_579.0, "decode_kv_token_reads": 138_104_924}  # fmt: skip
    jp = {"layer_params": 6.98e9, "lm_head_params": 128256 * 4096, "a": wl,
          "weight_bytes": 16.06e9, "step_weight_bytes": 15.01e9, "kv_bytes_per_token": 131072,
          "engine_args": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}}  # fmt: skip
    ceilings = {"matmul_TFLOPs": 774.0, "copy_GBps": 3282.0}
    bound, kind = e2e_report.throughput_roofline(jp, "a", ceilings)  # 26.82 TB: 8.17 s
    assert 18_100 < bound < 18_300 and kind == "memory"
    jp["a"] = dict(wl, max_output_tokens=1021)  # 33.43 TB: 10.19 s
    bound, kind = e2e_report.throughput_roofline(jp, "a", ceilings)
    assert 14_500 < bound < 14_700 and kind == "memory"
