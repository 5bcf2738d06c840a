"""Tables and charts of an end-to-end GPU run (benchmarks/e2e_gpu.py), from its e2e.json.

    python benchmarks/e2e_report.py e2e.json [--out DIR]

e2e_gpu.py calls render() at the end of a run (matplotlib is on the GPU machine); this
script renders a saved JSON again. Writes DIR/e2e_report.md (device, JAX version, date,
command, table) and, per model, DIR/e2e_<model>_throughput.png (output tok/s per workload,
jaxpaged vs HF) and DIR/e2e_<model>_decode.png (decode step time against plain XLA and the
roofline floor at each (batch, context) point).
"""

from __future__ import annotations

import argparse
import json
import os


def _num(x, spec: str = ",.0f") -> str:
    return "" if x is None else format(x, spec)


def _hf_tok_s(hf: dict, workload: str) -> float | None:
    """HF's output tok/s on a throughput workload (one static batch of 128), if run."""
    return hf.get(f"{workload}_batch128", {}).get("output_tokens_per_s")


def _idle(res: dict) -> str:
    """The device-idle share: host gaps before a step's launch began, and (runs after
    2026-12-03 morning) before it ended, the lower and upper bounds."""
    low, high = res["device_idle_fraction"], res.get("device_idle_upper")
    return f"{low:.0%}" if high is None else f"{low:.0%}-{high:.0%}"


def step_weight_bytes(jp: dict) -> int:
    """The weight bytes a step must read: all but an untied input embedding table, of which a
    step gathers only its tokens' rows (a tied table is the lm_head, read whole). Runs before
    the parameter counts were recorded count every weight byte; runs with the counts but
    without `step_weight_bytes` (2026-12-02 evening) are told apart by which of layers +
    head or layers + 2 x head divides the bytes."""
    if "step_weight_bytes" in jp:
        return jp["step_weight_bytes"]
    if "layer_params" not in jp:
        return jp["weight_bytes"]
    layers, head, total = jp["layer_params"], jp["lm_head_params"], jp["weight_bytes"]
    if total % (layers + 2 * head) == 0:  # untied
        return total - head * (total // (layers + 2 * head))
    return total


def throughput_roofline(jp: dict, workload: str, ceilings: dict) -> tuple[float, str] | None:
    """(most output tok/s, "compute" or "memory") on a throughput workload at the measured
    matmul rate and copy bandwidth; the time is at least the larger of
    - compute: every token through the layers (2 FLOP per parameter; attention not counted)
      and every output token's row through the lm_head;
    - memory: the decode steps' KV reads, plus the weights once per step, for the fewest
      steps this engine's max_num_seqs, max_num_batched_tokens and KV pool allow (a decode
      step reads at most the pool's tokens) and the workload allows: a step gives each
      request at most one token, so there are at least out / requests steps, and at least as
      many as the longest output's tokens (runs that record `max_output_tokens`)."""
    w = jp.get(workload, {})
    if "layer_params" not in jp or "num_input_tokens" not in w:
        return None
    if "matmul_TFLOPs" not in ceilings or "copy_GBps" not in ceilings:  # ceilings part failed
        return None
    out = w["num_output_tokens"]
    passes = w["num_input_tokens"] + out - w["num_requests"]  # the last token is not fed
    flops = 2 * jp["layer_params"] * passes + 2 * jp["lm_head_params"] * out
    times = {"compute": flops / (ceilings["matmul_TFLOPs"] * 1e12)}
    if "decode_kv_token_reads" in w and "engine_args" in jp:
        e = jp["engine_args"]
        rows = min(e["max_num_seqs"], w["num_requests"])
        steps = max(out / rows, passes / e["max_num_batched_tokens"],
                    w.get("max_output_tokens", 0))  # fmt: skip
        if jp.get("num_kv_blocks"):
            pool = (jp["num_kv_blocks"] - 1) * jp.get("block_size", 16)
            steps = max(steps, w["decode_kv_token_reads"] / pool)
        kv_bytes = w["decode_kv_token_reads"] * jp["kv_bytes_per_token"]
        moved = kv_bytes + steps * step_weight_bytes(jp)
        times["memory"] = moved / (ceilings["copy_GBps"] * 1e9)
    bound = max(times, key=times.get)
    return out / times[bound], bound if len(times) == 2 else "compute only, no KV counts"


def table(results: dict) -> str:
    """The markdown table of one e2e run: jaxpaged, HF, plain XLA and the roofline."""
    bw = results["ceilings"].get("copy_GBps", float("nan")) * 1e9
    rows = ["| model | measure | jaxpaged | HF | ratio / roofline |", "|---|---|---|---|---|"]
    for model, r in results["models"].items():
        jp, hf = r.get("jaxpaged", {}), r.get("hf", {})
        for w in ("a", "b", "c"):
            if w not in jp:
                continue
            tok, idle = jp[w]["output_tokens_per_s"], _idle(jp[w])
            ref = _hf_tok_s(hf, w)
            parts = [f"{tok / ref:.1f}x HF (static batch 128)"] if ref else []
            roof = throughput_roofline(jp, w, results["ceilings"])
            if roof:
                kind = f"{roof[1]}-bound" if roof[1] in ("compute", "memory") else roof[1]
                parts.append(f"roofline {roof[0]:,.0f} tok/s ({kind}; jaxpaged at "
                             f"{tok / roof[0]:.0%})")  # fmt: skip
            rows.append(
                f"| {model} | ({w}) output tok/s (device idle {idle}) | {_num(tok)} "
                f"| {_num(ref)} | {'; '.join(parts)} |"
            )
            slow = hf.get(f"{w}_batch128_inferred_mask", {}).get("output_tokens_per_s")
            if slow:  # e2e_gpu.py --hf-inferred-mask: the old baseline's slow path
                vs = f"{tok / slow:.1f}x HF on this path"
                if ref:
                    vs += f"; HF {ref / slow:.2f}x slower than with its all-ones mask"
                rows.append(f"| {model} | ({w}) HF with a pad id in the prompts and no mask "
                            f"(inferred) | | {_num(slow)} | {vs} |")  # fmt: skip
        for key in [k for k in jp if k.startswith("d_ctx")]:
            ms, ctx = jp[key]["per_output_token_ms"], int(key[5:])
            floor = (step_weight_bytes(jp) + jp["kv_bytes_per_token"] * ctx) / bw * 1e3
            ref = hf.get("d_ctx512", {}).get("output_tokens_per_s") if ctx == 512 else None
            rows.append(
                f"| {model} | (d) ms/token, ctx {ctx} | {ms:.2f} | "
                f"{_num(ref and 1e3 / ref, '.2f')} | {ms / floor:.2f}x floor "
                f"({floor:.2f} ms) |"
            )
        if "startup_s" in jp:
            warm = r.get("jaxpaged_warm", {}).get("startup_s")
            rows.append(
                f"| {model} | start-up s, cold / warm cache | {jp['startup_s']:.1f} / "
                f"{_num(warm, '.1f')} | | {jp['num_buckets']} buckets |"
            )
        xla = r.get("xla", {})
        sync = jp.get("sync", {})
        for key, val in jp.get("decode_steps", {}).items():
            b, ctx = (int(x) for x in key[1:].split("_ctx"))
            floor = (step_weight_bytes(jp) + jp["kv_bytes_per_token"] * b * ctx) / bw * 1e3
            base = xla.get(key, {})
            sy = sync.get("decode_steps", {}).get(key, {})
            rows.append(
                f"| {model} | decode step {key}: ms (idle {_idle(val)}) "
                f"| {val['ms_per_step']:.2f} | | {val['ms_per_step'] / floor:.2f}x floor "
                f"({floor:.2f} ms); plain XLA {_num(base.get('ms_per_step'), '.2f')} ms; "
                f"sync scheduling {_num(sy.get('ms_per_step'), '.2f')} ms |"
            )
        if "b" in sync:
            rows.append(
                f"| {model} | (b) sync scheduling: output tok/s (device idle "
                f"{sync['b']['device_idle_fraction']:.0%}) | "
                f"{_num(sync['b']['output_tokens_per_s'])} | | |"
            )
        rows += _depth_rows(model, jp)
    return "\n".join(rows)


def _depth_rows(model: str, jp: dict) -> list[str]:
    """The same engine at other async depths (e2e_gpu.py --compare-depths)."""
    rows = []
    for key in sorted(k for k in jp if k.startswith("async_depth_")):
        depth, other = key.removeprefix("async_depth_"), jp[key]
        label = f"async depth {depth} (the run's: {jp.get('async_depth')})"
        if "b" in other:
            o = other["b"]
            rows.append(
                f"| {model} | (b) at {label}: output tok/s (device idle "
                f"{o['device_idle_fraction']:.0%}) | {_num(o['output_tokens_per_s'])} | | |"
            )
        for point, val in other.get("decode_steps", {}).items():
            rows.append(
                f"| {model} | decode step {point} at {label}: ms | {val['ms_per_step']:.2f} | | |"
            )
    return rows


def _decode_points(results: dict, model: str) -> list[tuple[str, float, float | None, float]]:
    """(point, jaxpaged ms, plain XLA ms or None, floor ms) per decode-step point."""
    bw = results["ceilings"]["copy_GBps"] * 1e9
    r = results["models"][model]
    jp, xla = r.get("jaxpaged", {}), r.get("xla", {})
    out = []
    for key, val in jp.get("decode_steps", {}).items():
        b, ctx = (int(x) for x in key[1:].split("_ctx"))
        floor = (step_weight_bytes(jp) + jp["kv_bytes_per_token"] * b * ctx) / bw * 1e3
        out.append((key, val["ms_per_step"], xla.get(key, {}).get("ms_per_step"), floor))
    return out


def _save(fig, ax, title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(results: dict, out_dir: str) -> list[str]:
    """Write the report and charts; returns the paths written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = results["ceilings"]
    meta = (
        f"{c.get('device', '?')}, JAX {c.get('jax', '?')}, {c.get('date', '?')}; copy "
        f"{c['copy_GBps']:,.0f} GB/s, bf16 matmul {c['matmul_TFLOPs']:,.0f} TFLOP/s"
    )
    written = []
    for model, r in results["models"].items():
        jp, hf = r.get("jaxpaged", {}), r.get("hf", {})
        names = [w for w in ("a", "b", "c") if w in jp]
        if names:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], [jp[w]["output_tokens_per_s"] for w in names], 0.4,
                   label="jaxpaged")  # fmt: skip
            refs = [(i, v) for i, w in enumerate(names) if (v := _hf_tok_s(hf, w))]
            if refs:
                ax.bar([i + 0.2 for i, _ in refs], [v for _, v in refs], 0.4,
                       label="HF generate (batch 128)")  # fmt: skip
            roofs = [(i, r[0]) for i, w in enumerate(names) if (r := throughput_roofline(jp, w, c))]
            if roofs:
                ax.scatter([i for i, _ in roofs], [v for _, v in roofs], marker="_", s=400,
                           color="k", label="roofline (compute or memory)")  # fmt: skip
            top = max([jp[w]["output_tokens_per_s"] for w in names] + [v for _, v in refs + roofs])
            ax.set_ylim(0, 1.4 * top)  # room for the legend above the roofline marks
            ax.set_xticks(list(xs), [f"({w})" for w in names])
            ax.set_ylabel("output tokens / s")
            written.append(_save(fig, ax, f"{model}: offline throughput\n{meta}",
                                 os.path.join(out_dir, f"e2e_{model}_throughput.png")))  # fmt: skip
        points = _decode_points(results, model)
        if points:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            xs = range(len(points))
            ax.bar([x - 0.27 for x in xs], [p[1] for p in points], 0.27, label="jaxpaged")
            if any(p[2] for p in points):  # the plain XLA step, where it ran
                ax.bar([x for x in xs], [p[2] or 0 for p in points], 0.27, label="plain XLA step")
            ax.bar([x + 0.27 for x in xs], [p[3] for p in points], 0.27, label="roofline floor")
            ax.set_xticks(list(xs), [p[0] for p in points], fontsize=8)
            ax.set_ylabel("ms per decode step")
            written.append(_save(fig, ax, f"{model}: decode step time\n{meta}",
                                 os.path.join(out_dir, f"e2e_{model}_decode.png")))  # fmt: skip
    path = os.path.join(out_dir, "e2e_report.md")
    with open(path, "w") as f:
        f.write(f"# End-to-end run\n\n{meta}\n\nCommand: `{results.get('command', '?')}`\n\n")
        f.write(table(results) + "\n")
        for p in written:
            f.write(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n")
    return [path, *written]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    with open(args.json) as f:
        results = json.load(f)
    for path in render(results, args.out):
        print(path)


if __name__ == "__main__":
    main()
