"""Default batch limits by device (vLLM's), and the server's own defaults reaching the LLM."""

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
    monkeypatch.setattr(jax, "local_devices", lambda: [device])
    assert kv_sizing.default_batch_limits() == offline
    assert kv_sizing.default_batch_limits(for_server=True) == server


@pytest.mark.parametrize(
    "given,for_server,want",
    [
        ((None, None), False, (1024, 16384)),
        ((None, None), True, (1024, 8192)),
        ((64, None), True, (64, 8192)),
        ((9000, None), True, (9000, 9000)),  # a decode step of every sequence fits
        ((None, 4096), False, (1024, 4096)),
        ((None, 512), False, (512, 512)),  # the default seqs fit the user's budget
        ((8, 32), False, (8, 32)),
    ],
)
def test_unset_sizes_take_the_defaults(monkeypatch, given, for_server, want):
    monkeypatch.setattr(jax, "local_devices", lambda: [_device("gpu", "NVIDIA H200", 141e9)])
    assert kv_sizing.resolve_batch_limits(*given, for_server=for_server) == want


def test_set_sizes_do_not_query_the_device(monkeypatch):
    def no_device():
        raise AssertionError("queried the device")  # e.g. not addressable on a follower

    monkeypatch.setattr(jax, "local_devices", no_device)
    assert kv_sizing.resolve_batch_limits(64, 2048) == (64, 2048)


@pytest.mark.parametrize(
    "env,want",
    [({}, 0.75), ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, 0.5),
     ({"XLA_CLIENT_MEM_FRACTION": "0.6", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, 0.6),
     ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, 0.75)],
)  # fmt: skip
def test_mem_fraction_reads_both_names(monkeypatch, env, want):
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_PREALLOCATE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert envs.xla_mem_fraction() == want


def test_serve_builds_its_llm_with_the_server_defaults(monkeypatch):
    """`jaxpaged serve` asks LLM for the server's sizes, and passes only the flags given
    (the defaults are resolved inside LLM, after a multi-host run's distributed set-up)."""
    import argparse

    import jaxpaged.llm
    from server import cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(model=None, usage_context="llm", max_num_seqs=None):
        seen.update(usage_context=usage_context, max_num_seqs=max_num_seqs)
        raise Stop

    monkeypatch.setattr(jaxpaged.llm, "LLM", fake_llm)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(Stop):
        cli.run(parser.parse_args(["--max-num-seqs", "64"]))
    assert seen == {"usage_context": "server", "max_num_seqs": 64}
