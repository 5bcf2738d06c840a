"""host_memory: glibc's malloc thresholds are set on Linux, and the switch turns it off."""

from __future__ import annotations

import platform
import sys

import pytest

from jaxpaged.runner import host_memory


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)
def test_thresholds_are_set_on_glibc():
    assert host_memory.keep_freed_host_memory() is True
    assert host_memory.keep_freed_host_memory() is True  # idempotent


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("JAXPAGED_MALLOC_TUNING", "0")
    assert host_memory.keep_freed_host_memory() is False
