"""What the whole suite shares: guest builds, the sidecars a test starts, and skips for missing tools.

* ``guest_elf`` / ``deferral_elf``: the bare-metal and deferred-delivery test guests, built once per
  session into pytest's cache (the build is keyed by its inputs, so later runs reuse it).
* ``sidecars``: a list a test appends its :class:`~support.sidecar.RunningSidecar` objects to; each
  one still running at the end is shut down, whatever the test did.
* Tests marked ``qemu``, ``guest`` or ``linux`` need ``qemu-system-aarch64``; ``guest`` tests also
  build their guest with ``aarch64-linux-gnu-gcc``. Without the tool they are skipped, saying which
  package to install, instead of failing in a fixture.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from qmp_sdei.qemu.launch import QEMU_BINARY
from support.guests import CROSS, build_baremetal_guest, build_deferral_guest, cached_build_dir
from support.sidecar import RunningSidecar

CROSS_GCC = f"{CROSS}gcc"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_qemu = pytest.mark.skip(reason=f"{QEMU_BINARY} not found on PATH (Debian package qemu-system-arm)")
    no_gcc = pytest.mark.skip(reason=f"{CROSS_GCC} not found on PATH (Debian package gcc-aarch64-linux-gnu)")
    have_qemu = shutil.which(QEMU_BINARY) is not None
    have_gcc = shutil.which(CROSS_GCC) is not None
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        if not have_qemu and marks & {"qemu", "guest", "linux"}:
            item.add_marker(no_qemu)
        elif not have_gcc and "guest" in marks:
            item.add_marker(no_gcc)


@pytest.fixture(scope="session")
def guest_elf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bare-metal guest (``tests/guests/baremetal``)."""
    return build_baremetal_guest(cached_build_dir(request, tmp_path_factory, "baremetal-guest"))


@pytest.fixture(scope="session")
def deferral_elf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deferred-delivery guest (``tests/guests/deferral``)."""
    return build_deferral_guest(cached_build_dir(request, tmp_path_factory, "deferral-guest"))


@pytest_asyncio.fixture
async def sidecars() -> AsyncIterator[list[RunningSidecar]]:
    started: list[RunningSidecar] = []
    try:
        yield started
    finally:
        for running in started:
            if not running.task.done():
                with contextlib.suppress(Exception):
                    await running.stop()
