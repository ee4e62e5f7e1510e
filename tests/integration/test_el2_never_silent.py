"""Never silent through the EL2 stub: a guest booted through the stub but never told about SDEI
(its device tree has no /firmware/sdei) makes PSCI calls and no SDEI call, and the sidecar says so."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from qmp_sdei.conduit import el2
from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.linux_kernel import fetch_debian_kernel
from qmp_sdei.qemu.dtb import add_chosen, dump_qemu_dtb
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.stub import STUB_BASE, STUB_RESERVED, qemu_args
from support.linux import LINUX_MARKS

pytestmark = [*LINUX_MARKS, pytest.mark.qemu, pytest.mark.asyncio]

TIMEOUT = 60.0


class _Seen(logging.Handler):
    """Sets an event when a record containing ``needle`` is logged."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = needle
        self.event = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.needle in message:
            self.event.set()


@pytest.mark.parametrize(
    ("grace", "when"), [(0.5, "within the grace time"), (600.0, "before the VM stopped")], ids=["timer", "at-exit"]
)
async def test_a_guest_that_never_probes_sdei_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grace: float, when: str
) -> None:
    """The rootless kernel panics ~2 s in: a short grace reports while it runs, a long one when the
    VM goes (QEMU exits on the panic)."""
    monkeypatch.setattr(el2, "SDEI_PROBE_GRACE", grace)
    kernel = fetch_debian_kernel()
    spec = QemuSpec(
        smp=1, memory_mb=1024, machine_options={"virtualization": "on"}, paused=True, name="no-sdei", shared_ram=True
    )
    plain = await dump_qemu_dtb(spec, tmp_path / "plain.dtb")  # QEMU's own tree: no /firmware/sdei
    dtb = await add_chosen(
        plain, tmp_path / "guest.dtb", bootargs="console=ttyAMA0 panic=-1", reserve=(STUB_BASE, STUB_RESERVED)
    )
    spec.extra_args = qemu_args(kernel, dtb)
    seen = _Seen("no SDEI call")
    logging.getLogger("qmp_sdei.conduit").addHandler(seen)
    vm = QemuProcess(spec, tmp_path / "vm")
    try:
        await vm.start()
        config = parse(
            {
                "vm": {"name": "no-sdei", "state_dir": str(tmp_path / "state")},
                "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": TIMEOUT},
                "conduit": {"enabled": True, "start_vm": True},
                "log": {"level": "info", "format": "text"},
            }
        )
        sidecar = Sidecar(config)
        task = asyncio.create_task(sidecar.run(), name="no-sdei.sidecar")
        await asyncio.wait_for(vm.wait_for_console(r"psci: PSCIv\d+\.\d+ detected", TIMEOUT), TIMEOUT)
        waiter = asyncio.ensure_future(seen.event.wait())
        await asyncio.wait({waiter, task}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not seen.event.is_set():  # the sidecar ended first: its last words come as it ends
            await asyncio.wait_for(asyncio.shield(task), TIMEOUT)
        waiter.cancel()
        assert seen.event.is_set(), f"no warning; sidecar: {sidecar.shutdown_reason!r}, log: {seen.messages}"
        assert sidecar.owner is not None and sidecar.owner.problems, "the problem is not in the status"
        assert "no SDEI call" in sidecar.status()["problems"][0]
        sidecar.request_shutdown("test finished")
        assert await asyncio.wait_for(task, TIMEOUT) == ExitCode.OK
    finally:
        logging.getLogger("qmp_sdei.conduit").removeHandler(seen)
        await vm.stop()
    assert "sdei:" not in vm.console  # the kernel never heard of SDEI
    assert any("/firmware/sdei" in m and when in m for m in seen.messages), seen.messages
