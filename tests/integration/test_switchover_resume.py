"""Running a VM out of a migration's switchover stop, against a real QEMU: the paths where it cannot.

The path where it can (a switchover found at a breakpoint, cancelled without QEMU 8.1+ aborting)
runs end to end in test_migration_failures.py; here each refusal says so and changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qmp_sdei.conduit.service import resume_from_switchover_stop
from qmp_sdei.config import ConduitSettings
from qmp_sdei.qemu.migration import wait_left_finish_migrate
from qmp_sdei.qemu.qmp import VmEventKind, attach
from support.guests import free_port
from support.qemu import SLOW, requires_qemu, running_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio, requires_qemu]


async def test_no_gdbstub_means_nothing_to_resume(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        settings = ConduitSettings(enabled=True)
        assert not await resume_from_switchover_stop(s, settings, timeout=SLOW)
        assert await s.refresh_runstate() == "prelaunch"


async def test_unreachable_gdbstub_is_reported_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        settings = ConduitSettings(enabled=True, gdb=f"tcp:127.0.0.1:{free_port()}")  # nobody listens
        with caplog.at_level(logging.WARNING, logger="qmp_sdei.conduit"):
            assert not await resume_from_switchover_stop(s, settings, timeout=SLOW)
        assert "cannot reach the gdbstub" in caplog.text
        assert await s.refresh_runstate() == "prelaunch"


async def test_a_vm_outside_the_switchover_needs_no_wait(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        with s.subscribe({VmEventKind.RESUME}) as resumes:
            # prelaunch is not finish-migrate: answered from query-status, no RESUME awaited
            assert await wait_left_finish_migrate(s, resumes, timeout=SLOW)
