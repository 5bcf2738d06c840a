"""converters.convert: the CLI writes a complete orbax dir or nothing at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from converters import convert as convert_mod
from converters.hf import convert_params, flatten
from converters.safetensors_io import save_file


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = convert_mod.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_nothing_written(out_dir):
    parent = os.path.dirname(out_dir)
    assert not os.path.exists(out_dir)
    assert not [n for n in os.listdir(parent) if ".tmp-" in n], os.listdir(parent)


def test_cli_converts_and_copies_files(hf_dirs, tmp_path):
    """Run as `python -m converters.convert`; the output restores to the same tree."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "converters.convert",
            hf_dirs["llama"],
            str(out),
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == [
        "config.json",
        "generation_config.json",
        "jaxpaged.json",
        "params",
    ]
    assert json.loads((out / "jaxpaged.json").read_text())["dtype"] == "float32"

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        restored = flatten(ckptr.restore(str(out / "params")))
    want = flatten(convert_params(hf_dirs["llama"], dtype="float32"))
    assert restored.keys() == want.keys()
    for path, array in want.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), array, err_msg=str(path))


def test_existing_out_dir_needs_overwrite(hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err = run_cli(capsys, hf_dirs["qwen3"], out)
    assert rc == 1 and "not empty (pass --overwrite)" in err
    assert os.listdir(out) == ["keep.txt"]
    rc, err = run_cli(capsys, hf_dirs["qwen3"], out, "--overwrite")
    assert rc == 0, err
    assert "keep.txt" not in os.listdir(out) and "params" in os.listdir(out)
    assert [n for n in os.listdir(tmp_path)] == ["out"]  # no temp or old dirs left behind


def _rewrite(src, dst, edit) -> str:
    """Copy a single-file checkpoint, applying edit(tensors) to its weights."""
    d = copy_dir(src, dst)
    tensors = load_file(f"{d}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{d}/model.safetensors")
    return d


def _truncate(d):
    path = f"{d}/model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)


def _set_model_type(d, model_type):
    cfg = json.loads(open(f"{d}/config.json").read())
    cfg["model_type"] = model_type
    open(f"{d}/config.json", "w").write(json.dumps(cfg))


BAD_INPUTS = {
    "missing_tensor": (
        lambda d: _rewrite(d, d + "_", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [96, 64])",
    ),
    "wrong_shape": (
        lambda d: _rewrite(
            d,
            d + "_",
            lambda t: t.update(
                {"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), "f4")}
            ),
        ),
        "tensor model.layers.0.self_attn.k_proj.weight has shape [16, 64], expected [32, 64]",
    ),
    "unsupported_architecture": (
        lambda d: (_set_model_type(d, "gpt2"), d)[1],
        "Unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3",
    ),
    "missing_config": (
        lambda d: (os.remove(f"{d}/config.json"), d)[1],
        "no config.json",
    ),
    "truncated_file": (
        lambda d: (_truncate(d), d)[1],
        "model.safetensors: truncated safetensors file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(hf_dirs, tmp_path, capsys, case):
    make_bad, message = BAD_INPUTS[case]
    src = make_bad(copy_dir(hf_dirs["mistral"], tmp_path / "hf"))
    out = str(tmp_path / "outs" / "out")
    os.makedirs(os.path.dirname(out))
    rc, err = run_cli(capsys, src, out)
    assert rc == 1
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
    assert_nothing_written(out)


def test_failure_while_writing_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    def broken_save(params, path):
        os.makedirs(path)
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod, "save_params", broken_save)
    out = str(tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        convert_mod.convert(hf_dirs["qwen2"], out)
    assert_nothing_written(out)


def test_missing_shard_listed_in_index(hf_dirs, tmp_path, capsys):
    d = copy_dir(hf_dirs["llama"], tmp_path / "hf")
    index = json.loads(open(f"{d}/model.safetensors.index.json").read())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(f"{d}/{shard}")
    rc, err = run_cli(capsys, d, tmp_path / "out")
    assert rc == 1 and f"{shard}: listed in" in err
