"""A stock Debian arm64 kernel: fetch it, recover its symbols, find its trap sites, boot it on our DTB.

The boot here runs *without* any sidecar: the kernel must find ``/firmware/sdei`` in the DTB, make
its SDEI_VERSION call through ``__arm_smccc_hvc``, get NOT_SUPPORTED from QEMU's PSCI emulation
(every HVC lands there under TCG) and print the failure. That proves the DTB node is seen, the
kernel has the DT SDEI fix, and the boot command line is right, before any trapping is involved.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qmp_sdei.conduit.traps import (
    HVC_0,
    LINUX_DT_SDEI_FIX_SYMBOL,
    Kallsyms,
    kernel_has_dt_sdei_fix,
    linux_trap_sites,
    load_kallsyms,
)
from qmp_sdei.linux_kernel import DebianKernel, fetch_debian_kernel_package
from qmp_sdei.qemu.dtb import build_sdei_dtb
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from support.linux import LINUX_MARKS

pytestmark = [*LINUX_MARKS]

BOOT_TIMEOUT = 240.0  # TCG on a busy 2-core host; the line normally shows within a second or two
APPEND = "console=ttyAMA0 nokaslr panic=-1 nohlt"


@pytest.fixture(scope="module")
def kernel() -> DebianKernel:
    return fetch_debian_kernel_package()


@pytest.fixture(scope="module")
def kallsyms(kernel: DebianKernel) -> Kallsyms:
    return load_kallsyms(kernel.image)


def test_kernel_is_a_plain_image_with_sdei(kernel: DebianKernel) -> None:
    assert kernel.package.startswith("linux-image-") and kernel.package.endswith("-arm64")
    assert kernel.image.read_bytes()[0x38:0x3C] == b"ARM\x64"
    assert kernel.config is not None
    config = kernel.config.read_text()
    assert "CONFIG_ARM_SDE_INTERFACE=y" in config
    assert "CONFIG_ARM_PSCI_FW=y" in config


def test_trap_sites_of_the_debian_kernel(kernel: DebianKernel, kallsyms: Kallsyms) -> None:
    assert len(kallsyms) > 10_000
    assert kernel_has_dt_sdei_fix(kallsyms), f"{kernel.package} {kernel.version} lacks {LINUX_DT_SDEI_FIX_SYMBOL}"
    hvc_sites = linux_trap_sites(kernel.image, kallsyms, insns={HVC_0})
    # __arm_smccc_hvc starts with "bti c"; its hvc is the next instruction.
    assert kallsyms["__arm_smccc_hvc"] + 4 in hvc_sites
    # The SDEI exit hvc lies inside __sdei_asm_handler, before the next symbol.
    handler = kallsyms["__sdei_asm_handler"]
    handler_end = next(a for a in kallsyms.addresses if a > handler)
    assert [site for site in hvc_sites if handler <= site < handler_end], "no hvc in __sdei_asm_handler"
    # Everything found is inside one of the trap symbols, and the smc forms come along too.
    all_sites = linux_trap_sites(kernel.image, kallsyms)
    assert set(hvc_sites) < set(all_sites)
    assert kallsyms["__arm_smccc_smc"] + 4 in all_sites
    assert len(all_sites) <= 12


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_boot_without_sidecar_sees_sdei_node(kernel: DebianKernel, tmp_path: Path) -> None:
    spec = QemuSpec(smp=1, memory_mb=512, paused=False, kernel=kernel.image, append=APPEND)
    spec.dtb = await build_sdei_dtb(spec, tmp_path / "sdei.dtb")
    started = time.monotonic()
    async with QemuProcess(spec, tmp_path / "vm") as vm:
        await vm.wait_for_console(r"sdei: Failed to get SDEI version: -95", BOOT_TIMEOUT)
        elapsed = time.monotonic() - started
        await vm.wait_for_console(r"psci: PSCIv\d+\.\d+ detected in firmware\.", BOOT_TIMEOUT)
    print(f"{kernel.package} {kernel.version}: SDEI probe failure line after {elapsed:.2f}s")
    print("\n".join(line for line in vm.console.splitlines() if "sdei" in line or "psci" in line))
    assert "sdei: SDEIv" not in vm.console


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_boot_on_stock_dtb_says_nothing_about_sdei(kernel: DebianKernel, tmp_path: Path) -> None:
    """The other half of the control: without our node the SDEI driver never probes."""
    spec = QemuSpec(smp=1, memory_mb=512, paused=False, kernel=kernel.image, append=APPEND)
    async with QemuProcess(spec, tmp_path / "vm") as vm:
        await vm.wait_for_console(r"Kernel panic", BOOT_TIMEOUT)  # no rootfs: the end of this boot
    assert "psci: PSCIv" in vm.console
    assert "sdei:" not in vm.console
