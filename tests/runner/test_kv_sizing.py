"""Default batch limits by device (vLLM's), and the server's own defaults reaching the LLM."""

import argparse
from types import SimpleNamespace

import jax
import pytest

from jaxpaged import envs
from jaxpaged.runner import kv_sizing


def _device(platform, kind, total_bytes):
    limit = int(total_bytes * envs.xla_mem_fraction())  # the allocator's share of the device
    return SimpleNamespace(platform=platform, device_kind=kind,
                           memory_stats=lambda: {"bytes_limit": limit})  # fmt: skip


@pytest.mark.parametrize(
    "device,offline,server",
    [
        (_device("gpu", "NVIDIA H200", 141e9), (1024, 16384), (1024, 8192)),
        (_device("gpu", "NVIDIA H100 80GB HBM3", 79.6 * 2**30), (1024, 16384), (1024, 8192)),
        (_device("gpu", "NVIDIA A100-SXM4-80GB", 79.3 * 2**30), (256, 8192), (256, 2048)),
        (_device("gpu", "NVIDIA L4", 22.5 * 2**30), (256, 8192), (256, 2048)),
        (_device("cpu", "cpu", 0), (16, 256), (16, 256)),
    ],
)
def test_default_batch_limits_by_device(monkeypatch, device, offline, server):
    monkeypatch.setattr(jax, "devices", lambda: [device])
    assert kv_sizing.default_batch_limits() == offline
    assert kv_sizing.default_batch_limits(for_server=True) == server


def _serve_args(**given):
    from server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in given.items():
        setattr(args, key, value)
    return cli, args


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "given,want",
    [
        ({}, (1024, 8192)),
        ({"max_num_seqs": 64}, (64, 8192)),
        ({"max_num_seqs": 9000}, (9000, 9000)),
        ({"max_num_batched_tokens": 4096}, (1024, 4096)),
    ],
)
def test_serve_passes_the_server_defaults_to_llm(monkeypatch, given, want):
    import jaxpaged.llm

    seen = {}

    def fake_llm(model=None, max_num_seqs=None, max_num_batched_tokens=None):
        seen.update(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        raise _Stop

    monkeypatch.setattr(jaxpaged.llm, "LLM", fake_llm)
    monkeypatch.setattr(
        kv_sizing,
        "default_batch_limits",
        lambda for_server=False: (1024, 8192 if for_server else 1),
    )
    cli, args = _serve_args(**given)
    with pytest.raises(_Stop):
        cli.run(args)
    assert (seen["max_num_seqs"], seen["max_num_batched_tokens"]) == want
