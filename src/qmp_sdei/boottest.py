"""``qmp-sdei boot-test``: boot a stock arm64 Linux kernel with the sidecar and read what it detected.

The end-to-end check a user can run on their own host: the kernel finds ``/firmware/sdei`` in the
device tree, asks for the SDEI version through ``hvc`` (trapped by the sidecar's gdbstub conduit)
and prints ``sdei: SDEIv1.<minor> (0x<vendor>) detected in firmware.``; its PSCI probe asks
PSCI_VERSION (answered by the sidecar's pinning filter) and prints ``psci: PSCIv<maj>.<min>
detected in firmware.``. Both lines must show exactly the versions the sidecar was told to pin.

Steps (:func:`run_boot_test`):

1. Recover the kernel's symbols (``kallsyms-finder``, cached) and refuse a kernel that cannot print
   the SDEI line on a DT boot (the v5.19..59529bbe642d regression, see ``conduit/traps.py``).
2. Build QEMU's DTB plus ``/firmware/sdei`` (method hvc) with a ``/psci`` compatible matching the
   pinned PSCI version.
3. Start QEMU paused (``-S``) in a work directory, run a :class:`~qmp_sdei.daemon.Sidecar` in this
   process with the versions pinned and ``conduit.start_vm`` set, so the sidecar starts the guest
   once its breakpoints are armed.
4. Wait on the console for the two lines (with the timeout), compare them with the pins, record
   timings and the conduit's counters, then stop the sidecar (which detaches) and QEMU.

Problems with the inputs (no such kernel, a malformed version) raise
:class:`~qmp_sdei.errors.ConfigError`; everything that goes wrong during the boot ends up in the
:class:`BootReport` as ``passed=False`` with a one-line ``reason``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from qemu.qmp import QMPClient

from qmp_sdei import stub
from qmp_sdei.conduit.el2 import El2Conduit
from qmp_sdei.conduit.traps import LINUX_DT_SDEI_FIX_SYMBOL, kernel_has_dt_sdei_fix, load_kallsyms
from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.errors import ConfigError, QemuError, SdeiError, VersionError
from qmp_sdei.qemu.dtb import add_chosen, build_sdei_dtb, psci_compatible_for
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.versions import PSCI_FUNCTIONS, SDEI_FUNCTIONS, Version, format_version, parse_version

log = logging.getLogger(__name__)

APPEND = "console=ttyAMA0 panic=-1"
"""The kernel's own defaults (KASLR, WFI idle, KPTI where the CPU needs it). ``panic=-1`` with
``-no-reboot``: a rootless boot ends in one panic and QEMU exits instead of rebooting."""
SYMBOLS_APPEND = "console=ttyAMA0 nokaslr panic=-1 nohlt"
"""The symbol conduit's trap sites are link addresses: it needs ``nokaslr``."""
CPU = "cortex-a57"
CONDUITS = ("el2", "symbols")
FIRMWARES = ("direct", "uefi")
UEFI_FIRMWARE = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")  # Debian's qemu-efi-aarch64
MEMORY_MB = 1024
VM_NAME = "boot-test"
HARNESS_NAME = "boot-test-harness"
STOP_TIMEOUT = 15.0

SDEI_LINE = re.compile(
    r"^(?:\[\s*(?P<ts>\d+\.\d+)\] )?(?P<msg>sdei: (?:SDEIv(?P<major>\d+)\.(?P<minor>\d+) "
    r"\(0x(?P<vendor>[0-9a-f]+)\) detected in firmware\.|(?P<failed>Failed to get SDEI version: -?\d+)))\r?\n",
    re.MULTILINE,
)
PSCI_LINE = re.compile(
    r"^(?:\[\s*(?P<ts>\d+\.\d+)\] )?(?P<msg>psci: PSCIv(?P<major>\d+)\.(?P<minor>\d+) detected in firmware\.)\r?\n",
    re.MULTILINE,
)
CONSOLE_TAIL_LINES = 25
ARM64_MAGIC_OFFSET, ARM64_MAGIC, GZIP_MAGIC = 0x38, b"ARM\x64", b"\x1f\x8b"


@dataclass
class FoundLine:
    """A console line the test waited for."""

    text: str  # without the printk timestamp
    version: str | None  # "1.1", or None for a failure line
    vendor: int | None = None  # SDEI only
    after_qemu_start_s: float = 0.0
    after_vm_start_s: float | None = None
    kernel_timestamp_s: float | None = None  # the printk time, if the kernel prints times

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "version": self.version,
            "vendor": self.vendor,
            "after_qemu_start_s": round(self.after_qemu_start_s, 4),
            "after_vm_start_s": None if self.after_vm_start_s is None else round(self.after_vm_start_s, 4),
            "kernel_timestamp_s": self.kernel_timestamp_s,
        }


@dataclass
class BootReport:
    """What one boot test saw. ``passed`` only if both lines appeared with the pinned versions."""

    kernel: str
    smp: int
    expected: dict[str, str]
    cpu: str = CPU
    firmware: str = "direct"
    acpi: bool = False
    conduit_mode: str = "el2"
    cmdline: str = ""
    passed: bool = False
    reason: str | None = None
    lines: dict[str, FoundLine] = field(default_factory=dict)
    #: seconds: QEMU start -> VM started by the sidecar, sidecar QMP attach, sidecar ready, total
    timings: dict[str, float] = field(default_factory=dict)
    #: the conduit's counters at the end of the test (traps, SDEI calls, PSCI answered/passed through)
    conduit: dict[str, Any] = field(default_factory=dict)
    sidecar_exit: int | None = None
    #: the guest's VBAR_EL1 once the lines were seen (EL2 conduit): differs per boot under KASLR
    vbar_el1: int | None = None
    console_tail: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> BootReport:
        if self.reason is None:  # the first reason is the cause; later ones are consequences
            self.reason = reason
        self.passed = False
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "kernel": self.kernel,
            "smp": self.smp,
            "cpu": self.cpu,
            "firmware": self.firmware,
            "acpi": self.acpi,
            "conduit_mode": self.conduit_mode,
            "cmdline": self.cmdline,
            "expected": dict(self.expected),
            "lines": {name: line.to_dict() for name, line in self.lines.items()},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "conduit": dict(self.conduit),
            "sidecar_exit": self.sidecar_exit,
            "vbar_el1": None if self.vbar_el1 is None else f"{self.vbar_el1:#x}",
            "console_tail": list(self.console_tail),
        }

    def text(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        out = [
            f"boot-test {verdict}: {self.kernel} (smp {self.smp}, {self.cpu}, {self.firmware} boot"
            f"{' with ACPI' if self.acpi else ''}, "
            f"{self.conduit_mode} conduit), expecting SDEI {self.expected['sdei']} and PSCI {self.expected['psci']}",
            f"  command line: {self.cmdline}",
        ]
        if self.reason:
            out.append(f"  reason: {self.reason}")
        for name in ("sdei", "psci"):
            line = self.lines.get(name)
            if line is None:
                out.append(f"  {name}: no line")
                continue
            when = f"{line.after_qemu_start_s:.2f}s after QEMU start"
            if line.after_vm_start_s is not None:
                when += f", {line.after_vm_start_s:.2f}s after the VM started"
            if line.kernel_timestamp_s is not None:
                when += f", kernel time {line.kernel_timestamp_s:.3f}s"
            out.append(f"  {line.text}  ({when})")
        if self.vbar_el1 is not None:
            out.append(f"  VBAR_EL1 {self.vbar_el1:#x}")
        if self.timings:
            out.append("  timings: " + ", ".join(f"{k}={v:.3f}s" for k, v in self.timings.items()))
        if self.conduit:
            c = self.conduit
            out.append(
                f"  conduit: {c.get('traps', 0)} traps, {c.get('sdei_calls', 0)} SDEI calls, "
                f"PSCI {c.get('psci_answered', 0)} answered / {c.get('psci_passthrough', 0)} passed through"
                + (
                    f", trap handling median {c['trap_handling_median_us']:.0f} us"
                    if c.get("trap_handling_median_us") is not None
                    else ""
                )
            )
        if not self.passed and self.console_tail:
            out.append("  console (last lines):")
            out.extend(f"    {line}" for line in self.console_tail)
        return "\n".join(out)


def _version(text: str, known: dict[Version, Any], what: str) -> Version:
    try:
        return parse_version(text, known=known, what=what)
    except VersionError as err:
        raise ConfigError(f"boot-test: {err}") from err


def _check_kernel(kernel: Path) -> None:
    if not kernel.exists():
        raise ConfigError(f"boot-test: kernel image {kernel}: no such file")
    if not kernel.is_file():
        raise ConfigError(f"boot-test: kernel image {kernel}: not a regular file")
    try:
        with kernel.open("rb") as image:
            head = image.read(ARM64_MAGIC_OFFSET + 4)
    except OSError as err:
        raise ConfigError(f"boot-test: kernel image {kernel}: {err.strerror}") from err
    if head[:2] != GZIP_MAGIC and head[ARM64_MAGIC_OFFSET:] != ARM64_MAGIC:
        raise ConfigError(f"boot-test: {kernel} is not an arm64 Linux Image (no 'ARM\\x64' magic at 0x38)")


def _sidecar_config(kernel: Path | None, workdir: Path, vm: QemuProcess, sdei: str, psci: str) -> dict[str, Any]:
    conduit: dict[str, Any] = {"enabled": True, "start_vm": True}
    if kernel is not None:  # the symbol conduit; the EL2 stub needs no kernel
        conduit["kernel"] = str(kernel)
    return {
        "vm": {"name": VM_NAME, "state_dir": str(workdir / "state")},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": 30.0},
        "sdei": {"version": sdei},
        "psci": {"version": psci},
        "conduit": conduit,
        "log": {"level": "info", "format": "text"},
    }


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"boot-test: {what} {path}: no such file")


@contextlib.asynccontextmanager
async def _workdir(given: Path | None) -> AsyncIterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-boot-test-") as scratch:
        yield Path(scratch)


async def _first_resume(client: QMPClient, started: float, timings: dict[str, float]) -> None:
    """Record when the VM first runs: the sidecar's ``c`` after its breakpoints are armed."""
    with client.listener("RESUME") as listener:
        await listener.get()
    timings["vm_started"] = time.perf_counter() - started


async def run_boot_test(
    kernel: Path | str,
    *,
    expect_sdei: str = "1.1",
    expect_psci: str = "1.1",
    smp: int = 1,
    timeout: float = 120.0,
    workdir: Path | None = None,
    firmware: str = "direct",
    conduit: str = "el2",
    append: str | None = None,
    initrd: Path | str | None = None,
    cpu: str = CPU,
    console: Path | str | None = None,
    acpi: bool = False,
) -> BootReport:
    """Boot ``kernel`` with the sidecar pinning ``expect_sdei``/``expect_psci`` and check its lines.

    :param timeout: seconds from QEMU's start until both lines must have appeared.
    :param workdir: where QEMU's sockets, the DTB and the sidecar's state go (default: a temporary
        directory, removed afterwards).
    :param conduit: ``"el2"`` boots through the shipped EL2 stub (``virtualization=on``; no kernel
        symbols, the kernel's own defaults: KASLR, WFI idle); ``"symbols"`` traps the kernel's
        call sites found from its symbols (needs ``nokaslr``, which its default command line adds).
    :param append: the kernel command line (default :data:`APPEND`, or :data:`SYMBOLS_APPEND`).
    :param console: write the whole guest console there at the end.
    :param acpi: with ``firmware="uefi"``: an ACPI boot, SDEI announced by the ACPI table that
        ``sdeitab.efi`` installs, instead of the device tree.
    :raise ConfigError: the kernel path does not exist, or a version is malformed/unsupported.
    """
    kernel = Path(kernel)
    sdei_version = _version(expect_sdei, SDEI_FUNCTIONS, "SDEI")
    psci_version = _version(expect_psci, PSCI_FUNCTIONS, "PSCI")
    if smp < 1:
        raise ConfigError(f"boot-test: --smp must be at least 1, not {smp}")
    if firmware not in FIRMWARES:
        raise ConfigError(f"boot-test: --firmware {firmware!r} is not supported (choose {', '.join(FIRMWARES)})")
    if conduit not in CONDUITS:
        raise ConfigError(f"boot-test: --conduit {conduit!r} is not one of {', '.join(CONDUITS)}")
    if acpi and firmware != "uefi":
        raise ConfigError("boot-test: --acpi needs --firmware uefi (ACPI tables come from the firmware)")
    if firmware == "uefi" and conduit != "el2":
        raise ConfigError("boot-test: --firmware uefi needs the el2 conduit (the host does not trap a disk's kernel)")
    _check_kernel(kernel)
    initrd_path = Path(initrd) if initrd is not None else None
    if initrd_path is not None:
        _check_file(initrd_path, "initrd")
    cmdline = append if append is not None else (APPEND if conduit == "el2" else SYMBOLS_APPEND)
    expected = {"sdei": format_version(sdei_version), "psci": format_version(psci_version)}
    report = BootReport(
        kernel=str(kernel), smp=smp, expected=expected, cpu=cpu, firmware=firmware, conduit_mode=conduit,
        cmdline=cmdline, acpi=acpi,
    )  # fmt: skip

    t_setup = time.perf_counter()
    if conduit == "symbols":
        kallsyms = await asyncio.to_thread(load_kallsyms, kernel)
        if not kernel_has_dt_sdei_fix(kallsyms):
            return report.fail(
                f"{kernel.name} lacks {LINUX_DT_SDEI_FIX_SYMBOL}: on a device-tree boot this kernel never "
                "probes SDEI (v5.19+ without 59529bbe642d), so it cannot print the SDEI line; use a kernel "
                "with the fix (Debian 6.1.192 or later, or 6.12)"
            )

    async with _workdir(workdir) as work:
        try:
            spec = await qemu_spec(
                work, kernel, initrd=initrd_path, cmdline=cmdline, smp=smp, cpu=cpu, conduit=conduit,
                psci_version=psci_version, firmware=firmware, acpi=acpi,
            )  # fmt: skip
        except SdeiError as err:
            return report.fail(f"cannot build the SDEI device tree: {err}")
        report.timings["setup"] = time.perf_counter() - t_setup
        await _boot(report, spec, kernel if conduit == "symbols" else None, work, timeout=timeout, console=console)
    return report


# The machine for a boot through the EL2 stub: EL2 for the stub, and a GICv3, through whose
# redistributors the conduit wakes an idle vCPU at once (QEMU's virt defaults to a GICv2, where
# idle vCPUs wait for the stub's 1 ms poll; a GICv3 also allows more than 8 vCPUs). Its specs also
# set shared_ram: guest RAM in a shared memfd the sidecar maps to answer the stub's mailbox.
EL2_MACHINE: Final[dict[str, str]] = {"virtualization": "on", "gic-version": "3"}


async def qemu_spec(
    work: Path,
    kernel: Path,
    *,
    initrd: Path | None,
    cmdline: str,
    smp: int,
    cpu: str,
    conduit: str,
    psci_version: Version,
    firmware: str = "direct",
    acpi: bool = False,
    memory_mb: int = MEMORY_MB,
) -> QemuSpec:
    """The QEMU to start (DTB, and for UEFI the disk, built in ``work``): a direct ``-kernel``
    boot for the symbol conduit, or the EL2 stub entering the kernel (``conduit="el2"``), or the
    EL2 stub entering UEFI which boots the kernel from a disk image (``firmware="uefi"``)."""
    psci_compatible = psci_compatible_for(psci_version)
    if firmware == "uefi":
        return await _uefi_spec(
            work, kernel, initrd=initrd, cmdline=cmdline, smp=smp, cpu=cpu, psci_compatible=psci_compatible,
            acpi=acpi, memory_mb=memory_mb,
        )  # fmt: skip
    if conduit == "symbols":
        extra = ["-initrd", str(initrd)] if initrd is not None else []
        spec = QemuSpec(
            smp=smp, memory_mb=memory_mb, cpu=cpu, kernel=kernel, append=cmdline, paused=True, name=VM_NAME,
            extra_args=extra,
        )  # fmt: skip
        spec.dtb = await build_sdei_dtb(spec, work / "sdei.dtb", sdei_method="hvc", psci_compatible=psci_compatible)
        return spec
    spec = QemuSpec(
        smp=smp, memory_mb=memory_mb, cpu=cpu, machine_options=dict(EL2_MACHINE), paused=True, name=VM_NAME,
        shared_ram=True,
    )  # fmt: skip
    base = await build_sdei_dtb(spec, work / "sdei-base.dtb", sdei_method="smc", psci_compatible=psci_compatible)
    dtb = await add_chosen(
        base,
        work / "sdei.dtb",
        bootargs=cmdline,
        initrd=stub.initrd_range(initrd) if initrd is not None else None,
        kaslr_seed=secrets.randbits(64),  # QEMU's dumped (and cached) tree would repeat its seed
        reserve=(stub.STUB_BASE, stub.STUB_RESERVED),
    )
    spec.extra_args = stub.qemu_args(kernel, dtb, initrd=initrd)
    return spec


async def _uefi_spec(
    work: Path,
    kernel: Path,
    *,
    initrd: Path | None,
    cmdline: str,
    smp: int,
    cpu: str,
    psci_compatible: tuple[str, ...],
    acpi: bool = False,
    memory_mb: int = MEMORY_MB,
    disk: bool = True,
) -> QemuSpec:
    """UEFI (Debian's ``qemu-efi-aarch64``) from a disk holding the kernel, entered by the stub at
    EL1; ``virtio-rng`` so the EFI stub randomises the kernel's physical and virtual placement. The
    sidecar is never told about the kernel. A DT boot (``acpi=off``) by default; with ``acpi`` the
    OS gets QEMU's ACPI tables plus the SDEI table our UEFI app installs (see docs/el2-stub.md)."""
    if not UEFI_FIRMWARE.is_file():
        raise ConfigError(f"boot-test: UEFI firmware {UEFI_FIRMWARE} not found (Debian package qemu-efi-aarch64)")
    machine = {**EL2_MACHINE, "acpi": "on" if acpi else "off"}
    spec = QemuSpec(
        smp=smp, memory_mb=memory_mb, cpu=cpu, machine_options=machine, paused=True, name=VM_NAME, shared_ram=True
    )
    base = await build_sdei_dtb(spec, work / "sdei-base.dtb", sdei_method="smc", psci_compatible=psci_compatible)
    dtb = await add_chosen(base, work / "sdei.dtb", bootargs=cmdline, memory=stub.firmware_memory(memory_mb))
    spec.extra_args = stub.firmware_qemu_args(UEFI_FIRMWARE, dtb, memory_mb)
    if disk:
        image = await build_efi_disk(work / "disk.img", kernel, initrd=initrd, cmdline=cmdline, acpi_table=acpi)
        spec.extra_args += [
            "-drive", f"if=none,id=disk0,format=raw,file={image}",
            "-device", "virtio-blk-pci,drive=disk0",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
    return spec


async def build_efi_disk(
    out: Path, kernel: Path, *, initrd: Path | None, cmdline: str, acpi_table: bool = False
) -> Path:
    """A raw FAT disk image the firmware boots: the kernel (an EFI application) as the removable-
    media default ``EFI/BOOT/BOOTAA64.EFI`` (command line from the DT's ``/chosen``), or, with an
    initrd or ``acpi_table``, ``vmlinuz`` (+ ``initrd.img``) started by the UEFI shell's
    ``startup.nsh``, which first runs ``sdeitab.efi`` to install the ACPI SDEI table.
    :raise ConfigError: mkfs.vfat or mtools missing; :raise SdeiError: a tool failed."""
    for tool in ("mkfs.vfat", "mmd", "mcopy"):
        if shutil.which(tool) is None:
            raise ConfigError(f"boot-test: {tool} not found (Debian packages dosfstools and mtools)")
    payload = kernel.stat().st_size + (initrd.stat().st_size if initrd is not None else 0)
    size_kib = (payload // 1024 + 16 * 1024) // 1024 * 1024
    out.unlink(missing_ok=True)
    steps = [["mkfs.vfat", "-C", "-n", "QSDEI", str(out), str(size_kib)]]
    if initrd is None and not acpi_table:
        steps += [
            ["mmd", "-i", str(out), "::/EFI", "::/EFI/BOOT"],
            ["mcopy", "-i", str(out), str(kernel), "::/EFI/BOOT/BOOTAA64.EFI"],
        ]
    else:
        lines = ["fs0:"]
        if acpi_table:
            lines.append("\\sdeitab.efi")
            steps.append(["mcopy", "-i", str(out), str(stub.SDEI_ACPI_APP), "::/sdeitab.efi"])
        initrd_option = "initrd=\\initrd.img " if initrd is not None else ""
        lines.append(f"\\vmlinuz {initrd_option}{cmdline}")
        script = out.with_name("startup.nsh")
        script.write_text("".join(line + "\r\n" for line in lines), encoding="ascii")
        steps.append(["mcopy", "-i", str(out), str(kernel), "::/vmlinuz"])
        if initrd is not None:
            steps.append(["mcopy", "-i", str(out), str(initrd), "::/initrd.img"])
        steps.append(["mcopy", "-i", str(out), str(script), "::/startup.nsh"])
    for argv in steps:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise SdeiError(
                f"building the EFI disk: {' '.join(argv)} failed: {output.decode(errors='replace').strip()}"
            )
    return out


async def stub_boot_args(
    kernel: Path | str | None,
    dtb_out: Path | str,
    *,
    firmware: str = "direct",
    acpi: bool = False,
    initrd: Path | str | None = None,
    append: str = APPEND,
    smp: int = 1,
    cpu: str = CPU,
    memory_mb: int = MEMORY_MB,
    psci: str = "1.1",
    guest_ram: str | Path | None = None,
) -> list[str]:
    """QEMU arguments (machine, CPU, memory in a shared backend, and the stub boot) for ``qmp-sdei qemu-args``.

    ``guest_ram``: keep guest RAM in that file (``memory-backend-file``, for ``[conduit] guest_ram``)
    rather than a memfd the sidecar finds among QEMU's open files.

    Writes the DTB to ``dtb_out``: QEMU's tree for this machine with ``/firmware/sdei`` and
    ``/chosen`` (command line, initrd range, a fresh ``kaslr-seed``) for a direct boot of
    ``kernel``; for ``firmware="uefi"`` the tree the firmware gets (RAM shortened to hide the stub;
    no kernel: the guest boots from its own disk, which the caller adds with an RNG device). The
    caller adds its own devices, monitors and the sidecar's QMP socket.
    :raise ConfigError: missing files, a bad version, a missing kernel for a direct boot.
    """
    if firmware not in FIRMWARES:
        raise ConfigError(f"qemu-args: --firmware {firmware!r} is not supported (choose {', '.join(FIRMWARES)})")
    if acpi and firmware != "uefi":
        raise ConfigError("qemu-args: --acpi needs --firmware uefi")
    if firmware == "direct" and kernel is None:
        raise ConfigError("qemu-args: a direct boot needs --kernel")
    if guest_ram is not None and not Path(guest_ram).is_absolute():
        raise ConfigError(f"qemu-args: --guest-ram must be an absolute path, not {str(guest_ram)!r}")
    dtb_out = Path(dtb_out)
    kernel_path = Path(kernel) if kernel is not None else None
    if kernel_path is not None and firmware == "direct":
        _check_kernel(kernel_path)
    initrd_path = Path(initrd) if initrd is not None else None
    if initrd_path is not None:
        _check_file(initrd_path, "initrd")
    psci_version = _version(psci, PSCI_FUNCTIONS, "PSCI")
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-qemu-args-") as scratch:
        work = Path(scratch)
        if firmware == "uefi":
            spec = await _uefi_spec(
                work, Path("/nonexistent"), initrd=None, cmdline=append, smp=smp, cpu=cpu,
                psci_compatible=psci_compatible_for(psci_version), acpi=acpi, memory_mb=memory_mb, disk=False,
            )  # fmt: skip
        else:
            assert kernel_path is not None
            spec = await qemu_spec(
                work, kernel_path, initrd=initrd_path, cmdline=append, smp=smp, cpu=cpu, conduit="el2",
                psci_version=psci_version, memory_mb=memory_mb,
            )  # fmt: skip
        dtb_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "sdei.dtb", dtb_out)
    if firmware == "uefi":
        boot = stub.firmware_qemu_args(UEFI_FIRMWARE, dtb_out.resolve(), memory_mb)
    else:
        assert kernel_path is not None
        boot = stub.qemu_args(kernel_path, dtb_out.resolve(), initrd=initrd_path)
    # Guest RAM in a shared memory backend, as boot-test starts it: the sidecar maps it for the
    # stub's mailbox (see docs/deployment.md).
    spec.shared_ram_path = Path(guest_ram) if guest_ram is not None else None
    return ["-M", spec.machine_arg(), "-cpu", cpu, "-smp", str(smp), *spec.memory_args(), *boot]


async def _boot(
    report: BootReport, spec: QemuSpec, kernel: Path | None, work: Path, *, timeout: float, console: Path | str | None
) -> None:
    vm = QemuProcess(spec, work / "vm")
    started = time.perf_counter()
    sidecar: Sidecar | None = None
    sidecar_task: asyncio.Task[ExitCode] | None = None
    harness: QMPClient | None = None
    resume_task: asyncio.Task[None] | None = None
    try:
        try:
            await asyncio.wait_for(vm.start(), timeout)
        except (QemuError, TimeoutError) as err:
            report.fail(f"QEMU did not start: {err or 'timed out'}")
            return
        # The harness monitor only watches for the first RESUME, to time the boot from the
        # moment the sidecar lets the guest run.
        try:
            harness = await vm.connect_harness(max(0.1, started + timeout - time.perf_counter()), HARNESS_NAME)
        except (QemuError, TimeoutError) as err:
            report.fail(f"QEMU's monitor did not answer: {err or 'timed out'}")
            return
        resume_task = asyncio.create_task(_first_resume(harness, started, report.timings), name="boot.resume")

        config = parse(_sidecar_config(kernel, work, vm, report.expected["sdei"], report.expected["psci"]))
        sidecar = Sidecar(config)
        sidecar_task = asyncio.create_task(sidecar.run(), name="boot.sidecar")
        deadline = started + timeout
        await _wait_ready(report, sidecar, sidecar_task, deadline)
        report.timings["sidecar_ready"] = time.perf_counter() - started
        report.timings["sidecar_attach"] = sidecar.attach_seconds
        if report.reason is None:
            await _wait_lines(report, vm, sidecar_task, started, deadline)
            _add_sidecar_cause(report, sidecar, sidecar_task)
            await _read_vbar(report, sidecar)
        _collect_conduit(report, sidecar)
    finally:
        if resume_task is not None:
            resume_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await resume_task
        if sidecar is not None and sidecar_task is not None:
            await _stop_sidecar(report, sidecar, sidecar_task)
        if harness is not None:
            with contextlib.suppress(Exception):
                await harness.disconnect()
        await vm.stop()
        report.timings["total"] = time.perf_counter() - started
        if console is not None:
            try:
                Path(console).write_text(vm.console, encoding="utf-8")
            except OSError as err:
                report.fail(f"cannot write the console to {console}: {err.strerror}")
        if not report.passed:
            report.console_tail = vm.console.splitlines()[-CONSOLE_TAIL_LINES:]


async def _wait_ready(report: BootReport, sidecar: Sidecar, task: asyncio.Task[ExitCode], deadline: float) -> None:
    ready = asyncio.create_task(sidecar.ready.wait(), name="boot.ready")
    try:
        done, _ = await asyncio.wait(
            {ready, task}, timeout=max(0.0, deadline - time.perf_counter()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        ready.cancel()
    if task in done:
        report.fail(f"the sidecar stopped before serving: {sidecar.shutdown_reason or 'no reason given'}")
    elif not done:
        report.fail("the sidecar did not attach within the timeout")


async def _wait_lines(
    report: BootReport, vm: QemuProcess, sidecar_task: asyncio.Task[ExitCode], started: float, deadline: float
) -> None:
    async def wait(name: str, pattern: re.Pattern[str]) -> None:
        match = await vm.wait_for_console(pattern, max(0.0, deadline - time.perf_counter()))
        now = time.perf_counter() - started
        vm_started = report.timings.get("vm_started")
        groups = match.groupdict()
        failed = groups.get("failed")
        report.lines[name] = FoundLine(
            text=groups["msg"],
            version=None if failed else f"{groups['major']}.{groups['minor']}",
            vendor=int(groups["vendor"], 16) if groups.get("vendor") else None,
            after_qemu_start_s=now,
            after_vm_start_s=None if vm_started is None else now - vm_started,
            kernel_timestamp_s=float(groups["ts"]) if groups.get("ts") else None,
        )

    waits = [
        asyncio.create_task(wait("sdei", SDEI_LINE), name="boot.sdei-line"),
        asyncio.create_task(wait("psci", PSCI_LINE), name="boot.psci-line"),
    ]
    try:
        pending: set[asyncio.Future[Any]] = {*waits, sidecar_task}
        while any(not w.done() for w in waits):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if sidecar_task in done and any(not w.done() for w in waits):
                # The lines may still be in the pipe when a dying QEMU takes the sidecar with it.
                await asyncio.wait([w for w in waits if not w.done()], timeout=1.0)
                if any(not w.done() for w in waits):
                    report.fail(f"the sidecar stopped during the boot: {_ended(sidecar_task)}")
                    return
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    for name, w in zip(("sdei", "psci"), waits, strict=True):
        err = w.exception() if not w.cancelled() else None
        if isinstance(err, TimeoutError):
            report.fail(f"no {name} line within the timeout")
        elif isinstance(err, QemuError):
            report.fail(f"QEMU exited before the {name} line appeared")
        elif err is not None:
            report.fail(f"waiting for the {name} line failed: {err!r}")
    _judge(report)


def _ended(task: asyncio.Task[ExitCode]) -> str:
    if task.cancelled():
        return "cancelled"
    err = task.exception()
    return f"crashed: {err!r}" if err is not None else f"exit {task.result().name}"


def _judge(report: BootReport) -> None:
    sdei, psci = report.lines.get("sdei"), report.lines.get("psci")
    if sdei is None or psci is None:
        report.fail(report.reason or "a console line is missing")
        return
    if sdei.version is None:
        report.fail(f"the kernel did not get an SDEI version: {sdei.text!r}")
    elif sdei.version != report.expected["sdei"]:
        report.fail(f"the kernel detected SDEI {sdei.version}, but the sidecar pinned {report.expected['sdei']}")
    elif sdei.vendor != 0:
        report.fail(f"the kernel saw SDEI vendor {sdei.vendor:#x}, expected 0x0")
    if psci.version != report.expected["psci"]:
        report.fail(f"the kernel detected PSCI {psci.version}, but the sidecar pinned {report.expected['psci']}")
    if report.reason is None:
        report.passed = True


def _add_sidecar_cause(report: BootReport, sidecar: Sidecar, task: asyncio.Task[ExitCode]) -> None:
    """A sidecar that gave up (a conduit that cannot serve this guest) says why: add it."""
    if report.reason is not None and task.done() and sidecar.shutdown_reason:
        report.reason += f" ({sidecar.shutdown_reason})"


async def _read_vbar(report: BootReport, sidecar: Sidecar) -> None:
    """Where the kernel's vectors are this boot (informational: the rootless guest may already be
    panicking and gone)."""
    conduit = sidecar.conduit
    if isinstance(conduit, El2Conduit):
        with contextlib.suppress(SdeiError, TimeoutError):
            report.vbar_el1 = await asyncio.wait_for(conduit.read_system_register("VBAR_EL1"), 5.0)


def _collect_conduit(report: BootReport, sidecar: Sidecar) -> None:
    conduit = sidecar.conduit
    if conduit is None:
        return
    stats = conduit.stats
    samples = list(stats.trap_handling_ns)
    report.conduit = {
        "stops": stats.stops,
        "traps": stats.traps,
        "sdei_calls": stats.sdei_calls,
        "psci_answered": stats.psci_answered,
        "psci_passthrough": stats.psci_passthrough,
        "other_passthrough": stats.other_passthrough,
        "trap_sites": [f"{site:#x}" for site in sorted(conduit.trap_sites)],
        "trap_handling_median_us": round(statistics.median(samples) / 1e3, 1) if samples else None,
    }
    if hasattr(stats, "mailbox_calls"):  # the EL2 stub's calls answered without a stop
        mailbox = list(stats.mailbox_ns)
        report.conduit["mailbox_calls"] = stats.mailbox_calls
        report.conduit["mailbox_median_us"] = round(statistics.median(mailbox) / 1e3, 1) if mailbox else None


async def _stop_sidecar(report: BootReport, sidecar: Sidecar, task: asyncio.Task[ExitCode]) -> None:
    """Ask the sidecar to go (it detaches its breakpoints) and wait; cancel it if it hangs."""
    sidecar.request_shutdown("boot test finished")
    try:
        report.sidecar_exit = int(await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT))
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        report.fail("the sidecar did not stop within the shutdown timeout")
        return
    except Exception as err:  # a bug in the sidecar: report it rather than lose the boot result
        report.fail(f"the sidecar crashed: {err!r}")
        return
    if report.sidecar_exit != ExitCode.OK:
        report.fail(f"the sidecar exited with {ExitCode(report.sidecar_exit).name}: {sidecar.shutdown_reason}")
