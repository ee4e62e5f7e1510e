"""Marks for tests that boot the stock Debian arm64 kernel (fetched with apt, symbols via vmlinux-to-elf)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

LINUX_MARKS = [
    pytest.mark.linux,
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="fetching the Debian kernel needs apt"),
    pytest.mark.skipif(
        importlib.util.find_spec("vmlinux_to_elf") is None,
        reason="vmlinux-to-elf not installed (the 'linux' extra)",
    ),
]
