"""``qmp-sdei qemu-args``: the DTB and QEMU arguments that boot a kernel through the EL2 stub."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qmp_sdei.qemu.dtb import decompile_dtb
from qmp_sdei.stub import DTB_ADDR, KERNEL_ADDR, STUB_ELF

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmp_sdei", "qemu-args", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_prints_the_stub_boot_and_writes_the_dtb(tmp_path: Path) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 0x38 + b"ARM\x64")
    dtb = tmp_path / "guest.dtb"
    result = _run("--kernel", str(kernel), "--dtb-out", str(dtb), "--smp", "2", "--append", "console=ttyAMA0 quiet")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:2] == ["-M", "virt,virtualization=on,gic-version=3,memory-backend=qsdei-ram"]
    assert argv[argv.index("-m") : argv.index("-m") + 2] == ["-m", "1024"]
    assert argv[argv.index("-object") + 1] == "memory-backend-memfd,id=qsdei-ram,size=1024M,share=on"
    assert argv[argv.index("-smp") : argv.index("-smp") + 2] == ["-smp", "2"]
    assert argv[argv.index("-kernel") + 1] == str(STUB_ELF)
    assert f"loader,file={kernel},addr={KERNEL_ADDR:#x},force-raw=on" in argv
    assert f"loader,file={dtb.resolve()},addr={DTB_ADDR:#x},force-raw=on" in argv
    dts = await decompile_dtb(dtb)
    assert 'compatible = "arm,sdei-1.0";' in dts and 'method = "smc";' in dts
    assert 'bootargs = "console=ttyAMA0 quiet";' in dts
    assert "kaslr-seed" in dts
    assert 'compatible = "arm,gic-v3";' in dts  # the conduit wakes idle vCPUs through its redistributors


def test_missing_kernel_is_one_line_error(tmp_path: Path) -> None:
    result = _run("--kernel", "/nonexistent/Image", "--dtb-out", str(tmp_path / "x.dtb"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("qmp-sdei: ") and "/nonexistent/Image" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.dtb").exists()


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_uefi_args_hide_the_stub_from_the_firmware(tmp_path: Path) -> None:
    dtb = tmp_path / "fw.dtb"
    result = _run("--firmware", "uefi", "--dtb-out", str(dtb), "--memory", "2048")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:2] == ["-M", "virt,virtualization=on,gic-version=3,acpi=off,memory-backend=qsdei-ram"]
    assert argv[argv.index("-object") + 1] == "memory-backend-memfd,id=qsdei-ram,size=2048M,share=on"
    top = 0x4000_0000 + (2048 << 20) - 0x20_0000
    assert f"loader,addr={top + 4:#x},cpu-num=0" in argv
    assert argv[argv.index("-dtb") + 1] == str(dtb.resolve())
    dts = await decompile_dtb(dtb)
    assert "reg = <0x00 0x40000000 0x00 0x7fe00000>;" in dts  # 2 GiB minus the stub's 2 MiB


@pytest.mark.qemu
def test_guest_ram_in_a_named_file(tmp_path: Path) -> None:
    result = _run("--firmware", "uefi", "--dtb-out", str(tmp_path / "fw.dtb"), "--guest-ram", "/dev/shm/vm 1.ram")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[1].endswith(",memory-backend=qsdei-ram")
    backend = "memory-backend-file,id=qsdei-ram,size=1024M,mem-path=/dev/shm/vm 1.ram,share=on,discard-data=on"
    assert argv[argv.index("-object") + 1] == backend


def test_guest_ram_must_be_an_absolute_path(tmp_path: Path) -> None:
    result = _run("--firmware", "uefi", "--dtb-out", str(tmp_path / "fw.dtb"), "--guest-ram", "vm1.ram")
    assert result.returncode == 2 and "--guest-ram must be an absolute path" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "fw.dtb").exists()


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_direct_dtb_describes_the_memory_asked_for(tmp_path: Path) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 0x38 + b"ARM\x64")
    dtb = tmp_path / "guest.dtb"
    result = _run("--kernel", str(kernel), "--dtb-out", str(dtb), "--memory", "512")
    assert result.returncode == 0, result.stderr
    assert "reg = <0x00 0x40000000 0x00 0x20000000>;" in await decompile_dtb(dtb)


def test_direct_boot_needs_a_kernel(tmp_path: Path) -> None:
    result = _run("--dtb-out", str(tmp_path / "x.dtb"))
    assert result.returncode == 2 and "needs --kernel" in result.stderr
