"""``qmp-sdei boot-test``: a stock Debian arm64 kernel detects exactly the SDEI/PSCI versions the sidecar pins.

Each boot runs a real QEMU (TCG) and the whole sidecar in-process (QMP, version pinning, gdbstub
conduit trapping the kernel's ``hvc``). The kernel's own console lines are the verdict. A boot takes
1-3 s here; the timeouts are generous because CI hosts are slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmp_sdei import boottest
from qmp_sdei.boottest import BootReport, run_boot_test
from qmp_sdei.conduit import el2
from qmp_sdei.conduit.traps import Kallsyms
from qmp_sdei.errors import ConfigError
from qmp_sdei.linux_kernel import fetch_debian_kernel
from qmp_sdei.stub import STUB_ELF
from support.linux import LINUX_MARKS

pytestmark = [*LINUX_MARKS]

TIMEOUT = 120.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernel() -> Path:
    return fetch_debian_kernel()


def _stub_symbols() -> dict[str, int]:
    out = subprocess.run(["aarch64-linux-gnu-nm", str(STUB_ELF)], capture_output=True, text=True, check=True).stdout
    return {name: int(addr, 16) for addr, _kind, name in (line.split() for line in out.splitlines())}


EL2_SITES = (
    {_stub_symbols()[name] for name in ("stub_trap_site", "stub_unexpected", "stub_wake_site")}
    if subprocess.run(["which", "aarch64-linux-gnu-nm"], capture_output=True, check=False).returncode == 0
    else set()
)


def assert_passed(report: BootReport, sdei: str, psci: str) -> None:
    assert report.passed, report.text()
    assert report.reason is None
    assert report.lines["sdei"].text == f"sdei: SDEIv{sdei} (0x0) detected in firmware."
    assert report.lines["psci"].text == f"psci: PSCIv{psci} detected in firmware."
    assert report.expected == {"sdei": sdei, "psci": psci}
    # The sidecar answered the kernel's SDEI_VERSION (a trapped SDEI call) and its PSCI_VERSION.
    assert report.conduit["sdei_calls"] >= 1
    assert report.conduit["psci_answered"] >= 1
    assert report.sidecar_exit == 0
    timings = report.timings
    assert 0 < timings["vm_started"] < report.lines["sdei"].after_qemu_start_s <= timings["total"]


@pytest.mark.qemu
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sdei", "psci", "smp"),
    [("1.1", "1.0", 1), ("1.0", "1.1", 1), ("1.1", "0.2", 2)],
    ids=["sdei1.1-psci1.0", "sdei1.0-psci1.1", "sdei1.1-psci0.2-smp2"],
)
async def test_kernel_sees_the_pinned_versions(kernel: Path, tmp_path: Path, sdei: str, psci: str, smp: int) -> None:
    report = await run_boot_test(kernel, expect_sdei=sdei, expect_psci=psci, smp=smp, timeout=TIMEOUT, workdir=tmp_path)
    print(report.text())
    assert_passed(report, sdei, psci)
    # The state the sidecar kept is the pinned one.
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["pins"] == {"sdei": sdei, "sdei_vendor": 0, "psci": psci}
    if smp == 2:
        # The secondary is started with CPU_ON, passed through to QEMU, and makes its own SDEI calls.
        assert report.conduit["psci_passthrough"] >= 1
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        assert len(status["vm"]["vcpus"]) == 2


@pytest.mark.qemu
def test_cli_boot_test_json(kernel: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmp_sdei", "boot-test", "--kernel", str(kernel),
         "--expect-sdei", "1.1", "--expect-psci", "1.0", "--timeout", str(TIMEOUT), "--json"],
        capture_output=True, text=True, timeout=TIMEOUT + 60, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and doc["reason"] is None
    assert doc["expected"] == {"sdei": "1.1", "psci": "1.0"}
    assert doc["lines"]["sdei"]["text"] == "sdei: SDEIv1.1 (0x0) detected in firmware."
    assert doc["lines"]["sdei"]["version"] == "1.1"
    assert doc["lines"]["psci"]["text"] == "psci: PSCIv1.0 detected in firmware."
    assert doc["conduit"]["traps"] >= doc["conduit"]["sdei_calls"] >= 1
    assert doc["sidecar_exit"] == 0
    assert "Traceback" not in result.stderr
    # The defaults: the kernel's own command line, trapped at the EL2 stub's sites only.
    assert doc["cmdline"] == boottest.APPEND and "nokaslr" not in doc["cmdline"]
    assert doc["conduit_mode"] == "el2"
    assert doc["conduit"]["trap_sites"] == [f"{a:#x}" for a in sorted(EL2_SITES)]


@pytest.mark.parametrize(
    "kernel_arg",
    ["/nonexistent/vmlinuz", "/etc/hostname"],
    ids=["missing", "not-an-image"],
)
def test_cli_bad_kernel_is_one_line_error(kernel_arg: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmp_sdei", "boot-test", "--kernel", kernel_arg, "--timeout", "30"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert result.returncode not in (0, 1), result  # 1 would mean "booted and failed"
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qmp-sdei: ") and kernel_arg in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.asyncio
async def test_bad_versions_are_refused_before_booting(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(b"\0" * 0x38 + b"ARM\x64")
    with pytest.raises(ConfigError, match=r"PSCI version 2\.0 is not supported"):
        await run_boot_test(image, expect_sdei="1.1", expect_psci="2.0", smp=1, timeout=10)
    with pytest.raises(ConfigError, match=r"SDEI version 1\.2 is not supported"):
        await run_boot_test(image, expect_sdei="1.2", expect_psci="1.0", smp=1, timeout=10)


@pytest.mark.asyncio
async def test_kernel_without_dt_sdei_fix_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5.19+ kernel without 59529bbe642d never probes SDEI on DT: refuse, do not time out."""
    image = tmp_path / "Image"
    image.write_bytes(b"\0" * 0x38 + b"ARM\x64")
    old_table = Kallsyms([("__arm_smccc_hvc", 0xFFFF_8000_0802_8640), ("__sdei_asm_handler", 0xFFFF_8000_0801_6800)])
    monkeypatch.setattr(boottest, "load_kallsyms", lambda _image: old_table)
    report = await run_boot_test(image, expect_sdei="1.1", expect_psci="1.0", smp=1, timeout=10, conduit="symbols")
    assert not report.passed
    assert report.reason is not None and "acpi_sdei_init" in report.reason
    assert "FAILED" in report.text() and "acpi_sdei_init" in report.text()
    assert report.to_dict()["passed"] is False
    assert not report.lines


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_two_kaslr_boots_land_at_different_offsets(kernel: Path, tmp_path: Path) -> None:
    """The kernel's defaults (KASLR on, KPTI forced by it on cortex-a57): pinned versions from the
    first call, at a different kernel placement each boot, with no kernel symbols on the host."""
    vbars = []
    for n in range(2):
        console = tmp_path / f"console{n}.txt"
        report = await run_boot_test(
            kernel, expect_sdei="1.1", expect_psci="1.0", smp=2, timeout=TIMEOUT, workdir=tmp_path / str(n),
            console=console,
        )  # fmt: skip
        print(report.text())
        assert_passed(report, "1.1", "1.0")
        text = console.read_text()
        assert "KASLR enabled" in text or "forced ON by KASLR" in text, text[-2000:]
        assert "All CPU(s) started at EL1" in text
        assert report.vbar_el1 is not None
        vbars.append(report.vbar_el1)
    assert vbars[0] != vbars[1], f"both boots put the vectors at {vbars[0]:#x}"


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_stub_boot_on_cpu_max(kernel: Path, tmp_path: Path) -> None:
    """-cpu max: SVE (its callers may set the SMCCC v1.3 hint), PAC and BTI under the stub."""
    report = await run_boot_test(
        kernel, expect_sdei="1.1", expect_psci="1.0", smp=2, cpu="max", timeout=TIMEOUT, workdir=tmp_path,
        console=tmp_path / "console.txt",
    )  # fmt: skip
    print(report.text())
    assert_passed(report, "1.1", "1.0")
    assert "SVE: maximum available vector length" in (tmp_path / "console.txt").read_text()


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_symbol_conduit_still_serves_a_nokaslr_kernel(kernel: Path, tmp_path: Path) -> None:
    report = await run_boot_test(
        kernel, expect_sdei="1.1", expect_psci="1.0", smp=1, timeout=TIMEOUT, workdir=tmp_path, conduit="symbols"
    )
    print(report.text())
    assert_passed(report, "1.1", "1.0")
    assert "nokaslr" in report.cmdline
    assert len(report.conduit["trap_sites"]) >= 3  # the kernel's own hvc sites, not the stub's


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"firmware": "bios"}, "--firmware 'bios' is not supported"),
        ({"conduit": "kvm"}, "--conduit 'kvm' is not one of"),
        ({"initrd": "/nonexistent/initrd"}, "initrd /nonexistent/initrd: no such file"),
    ],
    ids=["firmware", "conduit", "initrd"],
)
async def test_bad_boot_options_are_refused_before_booting(tmp_path: Path, kwargs: dict[str, str], match: str) -> None:
    image = tmp_path / "Image"
    image.write_bytes(b"\0" * 0x38 + b"ARM\x64")
    with pytest.raises(ConfigError, match=match):
        await run_boot_test(image, timeout=10, **kwargs)  # type: ignore[arg-type]


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_symbol_conduit_follows_kaslr(kernel: Path, tmp_path: Path) -> None:
    """The KVM-host path on a KASLR kernel: the sidecar reads VBAR_EL1 while the kernel boots and
    moves its trap sites by the offset before the first PSCI call."""
    report = await run_boot_test(
        kernel, expect_sdei="1.1", expect_psci="1.0", smp=1, timeout=TIMEOUT, workdir=tmp_path, conduit="symbols",
        append="console=ttyAMA0 panic=-1",
    )  # fmt: skip
    print(report.text())
    assert_passed(report, "1.1", "1.0")
    link_sites = set(el2.linux_trap_sites(kernel, el2.load_kallsyms(kernel)))
    moved = {int(site, 16) for site in report.conduit["trap_sites"]}
    assert moved and not moved & link_sites, "the trap sites were not moved by the KASLR offset"


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_stale_trap_site_fails_loudly(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trap site that does not hold hvc/smc (the guest runs another kernel than the image read)."""
    real = el2.linux_trap_sites

    def with_a_stale_site(image: Path, kallsyms: object) -> list[int]:
        sites = real(image, kallsyms)  # type: ignore[arg-type]
        return [*sites, sites[0] + 4]  # the instruction after an hvc is not a call

    monkeypatch.setattr(el2, "linux_trap_sites", with_a_stale_site)
    report = await run_boot_test(
        kernel, expect_sdei="1.1", expect_psci="1.0", smp=1, timeout=TIMEOUT, workdir=tmp_path, conduit="symbols"
    )
    print(report.text())
    assert not report.passed
    assert report.reason is not None and "do not hold hvc/smc" in report.reason, report.reason


@pytest.mark.qemu
@pytest.mark.asyncio
@pytest.mark.skipif(not boottest.UEFI_FIRMWARE.is_file(), reason="qemu-efi-aarch64 not installed")
@pytest.mark.parametrize(("cpu", "smp"), [("cortex-a57", 2), ("max", 1)], ids=["a57-smp2", "max-smp1"])
async def test_uefi_boot_from_a_disk_image(kernel: Path, tmp_path: Path, cpu: str, smp: int) -> None:
    """UEFI entered by the stub boots the kernel from a disk image boot-test builds; virtio-rng lets
    the EFI stub randomise the placement; the sidecar has no kernel image at all."""
    console = tmp_path / "console.txt"
    report = await run_boot_test(
        kernel, expect_sdei="1.1", expect_psci="1.0", smp=smp, cpu=cpu, timeout=TIMEOUT * 2, workdir=tmp_path,
        firmware="uefi", console=console,
    )  # fmt: skip
    print(report.text())
    assert_passed(report, "1.1", "1.0")
    text = console.read_text(errors="replace")
    assert "EFI stub: Using DTB from configuration table" in text
    assert "All CPU(s) started at EL1" in text
    config = json.loads((tmp_path / "state" / "state.json").read_text())
    assert config["pins"]["psci"] == "1.0"
    assert report.firmware == "uefi" and report.to_dict()["firmware"] == "uefi"


@pytest.mark.qemu
@pytest.mark.asyncio
@pytest.mark.skipif(not boottest.UEFI_FIRMWARE.is_file(), reason="qemu-efi-aarch64 not installed")
async def test_uefi_acpi_boot_finds_sdei_in_our_acpi_table(kernel: Path, tmp_path: Path) -> None:
    """ACPI (UEFI's default): sdeitab.efi installs an ACPI SDEI table before the kernel runs."""
    console = tmp_path / "console.txt"
    report = await run_boot_test(
        kernel, expect_sdei="1.1", expect_psci="1.0", smp=2, timeout=TIMEOUT * 2, workdir=tmp_path,
        firmware="uefi", acpi=True, console=console,
    )  # fmt: skip
    print(report.text())
    assert_passed(report, "1.1", "1.0")
    text = console.read_text(errors="replace")
    assert "qmp-sdei: installed the ACPI SDEI table" in text
    assert "ACPI: SDEI " in text and "psci: probing for conduit method from ACPI." in text
    assert "with ACPI" in report.text()


@pytest.mark.asyncio
async def test_acpi_needs_uefi(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(b"\0" * 0x38 + b"ARM\x64")
    with pytest.raises(ConfigError, match="--acpi needs --firmware uefi"):
        await run_boot_test(image, timeout=10, acpi=True)
