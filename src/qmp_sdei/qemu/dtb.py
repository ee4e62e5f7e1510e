"""Make a device tree that tells the guest about SDEI, starting from the one QEMU would give it.

Linux only probes SDEI if the DT has ``/firmware/sdei`` with ``compatible = "arm,sdei-1.0"`` and a
``method`` (``docs/sdei.md``, "How a guest finds SDEI"); QEMU's ``virt`` board never creates that
node. We cannot patch the tree inside a running QEMU, so we let QEMU generate its tree for the *same* machine
(``-machine ...,dumpdtb=FILE`` writes it and exits), add the node, and the VM is then started with
``-dtb``. Same machine means same ``-M``/``-cpu``/``-smp``/``-m`` and extra arguments: the tree
describes memory size, CPU nodes and devices, and a mismatch would lie to the guest.

Editing is done by appending a second ``/ { ... };`` block to the decompiled source. dtc merges
blocks with the same path, so this adds ``sdei`` under an existing ``/firmware`` node or creates
one, and overrides ``/psci``'s ``compatible`` when a PSCI version is pinned, without us parsing DTS.

Results are cached by every input that affects them (QEMU binary identity included), since a boot
test builds the same tree each run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qmp_sdei.cache import cache_root
from qmp_sdei.errors import ConfigError, DtbError, QemuError, SdeiError, VersionError
from qmp_sdei.qemu.launch import QEMU_BINARY, QemuSpec

DTC = "dtc"
SDEI_COMPATIBLE = "arm,sdei-1.0"  # the binding's only string; it covers every SDEI 1.x
SDEI_METHODS = ("hvc", "smc")
_CACHE_FORMAT = 1  # bump when the produced tree changes for the same inputs


def psci_compatible_for(version: tuple[int, int] | str) -> tuple[str, ...]:
    """The ``/psci`` ``compatible`` list a pinned PSCI version should advertise.

    The binding has strings for 0.1, 0.2 and 1.0 only; later 1.x versions are discovered through
    PSCI_VERSION, so they keep ``arm,psci-1.0`` (QEMU 7.2 itself implements 1.1 under that string).
    Each list ends with the older strings, as QEMU and real firmware do.
    """
    if isinstance(version, str):
        match = re.fullmatch(r"(\d+)\.(\d+)", version.strip())
        if match is None:
            raise VersionError(f"PSCI version {version!r} is not MAJOR.MINOR")
        version = (int(match.group(1)), int(match.group(2)))
    match version:
        case (0, 1):
            return ("arm,psci",)
        case (0, 2):
            return ("arm,psci-0.2", "arm,psci")
        case (1, _):
            return ("arm,psci-1.0", "arm,psci-0.2", "arm,psci")
    raise VersionError(f"no device-tree binding for PSCI {version[0]}.{version[1]}")


def _dts_string_list(values: Sequence[str]) -> str:
    for value in values:
        if not value or any(c in value for c in '"\\\n\0'):
            raise ConfigError(f"invalid device-tree string {value!r}")
    return ", ".join(f'"{value}"' for value in values)


def sdei_overlay(sdei_method: str, psci_compatible: Sequence[str] | None) -> str:
    """The DTS block appended to QEMU's tree (exposed for tests and for ``--dry-run`` style output)."""
    lines = [
        "",
        "/* added by qmp-sdei */",
        "/ {",
        "\tfirmware {",
        "\t\tsdei {",
        f'\t\t\tcompatible = "{SDEI_COMPATIBLE}";',
        f'\t\t\tmethod = "{sdei_method}";',
        "\t\t};",
        "\t};",
    ]
    if psci_compatible is not None:
        lines += ["\tpsci {", f"\t\tcompatible = {_dts_string_list(psci_compatible)};", "\t};"]
    lines += ["};", ""]
    return "\n".join(lines)


def _dump_spec(spec: QemuSpec, dump: Path) -> QemuSpec:
    """The spec QEMU should run to write its tree: the same machine, nothing guest-specific."""
    options = {k: v for k, v in spec.machine_options.items() if k != "dumpdtb"}
    options["dumpdtb"] = str(dump)
    return dataclasses.replace(
        spec,
        machine_options=options,
        kernel=None,
        dtb=None,
        append=None,
        gdb=None,
        paused=True,
        sidecar_listens=False,
    )


def _cache_key(spec: QemuSpec, sdei_method: str, psci_compatible: Sequence[str] | None) -> str:
    qemu = shutil.which(QEMU_BINARY)
    identity: list[object] = [None]
    if qemu is not None:
        real = Path(qemu).resolve()
        stat = real.stat()
        identity = [str(real), stat.st_size, stat.st_mtime_ns]
    material = {
        "format": _CACHE_FORMAT,
        "qemu": identity,
        "machine": spec.machine,
        "machine_options": sorted((k, v) for k, v in spec.machine_options.items() if k != "dumpdtb"),
        "cpu": spec.cpu,
        "smp": spec.smp,
        "memory_mb": spec.memory_mb,
        "extra_args": list(spec.extra_args),
        "sdei_method": sdei_method,
        "psci_compatible": list(psci_compatible) if psci_compatible is not None else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


async def _run(argv: list[str], timeout: float, what: str) -> tuple[int, str]:
    """Run a short-lived tool, returning (exit status, stderr); kill it if it overstays."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as err:
        proc.kill()
        await proc.wait()
        raise DtbError(f"{what} did not finish within {timeout}s: {' '.join(argv)}") from err
    text = (stderr + stdout).decode("utf-8", "replace").strip()
    assert proc.returncode is not None
    return proc.returncode, text


async def dump_qemu_dtb(spec: QemuSpec, out: Path, *, timeout: float = 60.0) -> Path:
    """Write the DTB QEMU generates for ``spec``'s machine to ``out`` and return ``out``."""
    if shutil.which(QEMU_BINARY) is None:
        raise QemuError(f"{QEMU_BINARY} not found on PATH (Debian package qemu-system-arm)")
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-dtb-") as scratch:
        workdir = Path(scratch)
        dump = workdir / "qemu.dtb"
        argv = _dump_spec(spec, dump).argv(workdir)
        try:
            status, output = await _run(argv, timeout, "QEMU's DTB dump")
        except SdeiError as err:
            raise QemuError(str(err)) from err
        if status != 0 or not dump.exists() or dump.stat().st_size == 0:
            raise QemuError(f"QEMU could not dump its DTB (exit {status}): {output}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dump, out)
    return out


async def _dtc(args: list[str], timeout: float, what: str) -> None:
    if shutil.which(DTC) is None:
        raise DtbError(f"{DTC} not found on PATH (Debian package device-tree-compiler)")
    status, output = await _run([DTC, "-q", *args], timeout, what)
    if status != 0:
        raise DtbError(f"{what} failed (dtc exit {status}): {output}")


async def build_sdei_dtb(
    spec: QemuSpec,
    out: Path,
    *,
    sdei_method: str = "hvc",
    psci_compatible: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Write to ``out`` QEMU's DTB for ``spec``'s machine plus ``/firmware/sdei``; return ``out``.

    ``sdei_method`` is the conduit Linux will use ("hvc" for ``-M virt`` without EL2/EL3, where
    QEMU's PSCI also uses HVC). ``psci_compatible`` replaces ``/psci``'s ``compatible`` so the
    advertised binding matches a pinned PSCI version (see :func:`psci_compatible_for`); the machine
    must have a ``psci`` node (``secure=on`` without firmware has none). The guest-specific parts of
    ``spec`` (kernel, dtb, append, gdb) are ignored: with ``-dtb``, QEMU still adds ``bootargs``.
    """
    if sdei_method not in SDEI_METHODS:
        raise ConfigError(f"sdei method must be one of {', '.join(SDEI_METHODS)}, not {sdei_method!r}")
    overlay = sdei_overlay(sdei_method, psci_compatible)
    cached: Path | None = None
    if use_cache:
        cached = (cache_dir or cache_root() / "dtb") / f"sdei-{_cache_key(spec, sdei_method, psci_compatible)}.dtb"
        if cached.is_file() and cached.stat().st_size:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, out)
            return out

    with tempfile.TemporaryDirectory(prefix="qmp-sdei-dtb-") as scratch:
        base_dtb, dts, result = (
            Path(scratch, "qemu.dtb"),
            Path(scratch, "sdei.dts"),
            Path(scratch, "sdei.dtb"),
        )
        await dump_qemu_dtb(spec, base_dtb, timeout=timeout)
        await _dtc(["-I", "dtb", "-O", "dts", "-o", str(dts), str(base_dtb)], timeout, "decompiling QEMU's DTB")
        source = dts.read_text(encoding="utf-8")
        if psci_compatible is not None and re.search(r"^\tpsci \{", source, re.MULTILINE) is None:
            raise QemuError(f"QEMU's tree for -M {spec.machine} has no /psci node to pin (secure=on without firmware?)")
        dts.write_text(source + overlay, encoding="utf-8")
        await _dtc(["-I", "dts", "-O", "dtb", "-o", str(result), str(dts)], timeout, "compiling the SDEI DTB")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result, out)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=cached.name, suffix=".tmp")
            os.close(fd)
            shutil.copyfile(result, tmp)
            os.replace(tmp, cached)  # atomic, so a concurrent builder never reads half a file
    return out


async def decompile_dtb(dtb: Path, *, timeout: float = 60.0) -> str:
    """Return the DTS text of a DTB (used by tests and for showing the user what the guest gets)."""
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-dtb-") as scratch:
        dts = Path(scratch, "out.dts")
        await _dtc(["-I", "dtb", "-O", "dts", "-o", str(dts), str(dtb)], timeout, f"decompiling {dtb}")
        return dts.read_text(encoding="utf-8")


def chosen_overlay(
    bootargs: str,
    initrd: tuple[int, int] | None,
    kaslr_seed: int | None,
    reserve: tuple[int, int] | None = None,
    memory: tuple[int, int] | None = None,
) -> str:
    """A ``/chosen`` block: the kernel command line, the initrd range, a KASLR seed.

    For a kernel QEMU does not boot itself (the EL2 stub enters it), QEMU fills in none of these,
    and a cached tree would repeat its one ``kaslr-seed`` on every boot. ``reserve`` (address, size)
    becomes a ``no-map`` ``/reserved-memory`` region: memory the guest must never touch (the stub).
    ``memory`` (base, size) replaces the RAM range of QEMU's ``memory@40000000`` node.
    """
    if any(c in bootargs for c in '"\\\n\0'):
        raise ConfigError(f"kernel command line {bootargs!r} has a character a DTB string cannot hold")
    lines = ["", "/* added by qmp-sdei */", "/ {", "\tchosen {", f'\t\tbootargs = "{bootargs}";']
    if initrd is not None:
        start, end = initrd
        lines += [f"\t\tlinux,initrd-start = <0x0 {start:#x}>;", f"\t\tlinux,initrd-end = <0x0 {end:#x}>;"]
    if kaslr_seed is not None:
        lines.append(f"\t\tkaslr-seed = <{kaslr_seed >> 32:#x} {kaslr_seed & 0xFFFF_FFFF:#x}>;")
    lines.append("\t};")
    if memory is not None:
        base, size = memory
        cells = f"{base >> 32:#x} {base & 0xFFFF_FFFF:#x} {size >> 32:#x} {size & 0xFFFF_FFFF:#x}"
        lines += ["\tmemory@40000000 {", f"\t\treg = <{cells}>;", "\t};"]
    if reserve is not None:
        addr, size = reserve
        lines += [
            "\treserved-memory {",
            "\t\t#address-cells = <2>;",
            "\t\t#size-cells = <2>;",
            "\t\tranges;",
            f"\t\tqmp-sdei-el2-stub@{addr:x} {{",
            f"\t\t\treg = <{addr >> 32:#x} {addr & 0xFFFF_FFFF:#x} {size >> 32:#x} {size & 0xFFFF_FFFF:#x}>;",
            "\t\t\tno-map;",
            "\t\t};",
            "\t};",
        ]
    lines += ["};", ""]
    return "\n".join(lines)


async def add_chosen(
    dtb: Path,
    out: Path,
    *,
    bootargs: str,
    initrd: tuple[int, int] | None = None,
    kaslr_seed: int | None = None,
    reserve: tuple[int, int] | None = None,
    memory: tuple[int, int] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Write ``dtb`` with :func:`chosen_overlay` merged in to ``out``; return ``out``."""
    overlay = chosen_overlay(bootargs, initrd, kaslr_seed, reserve, memory)
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-dtb-") as scratch:
        dts, result = Path(scratch, "in.dts"), Path(scratch, "out.dtb")
        await _dtc(["-I", "dtb", "-O", "dts", "-o", str(dts), str(dtb)], timeout, f"decompiling {dtb}")
        dts.write_text(dts.read_text(encoding="utf-8") + overlay, encoding="utf-8")
        await _dtc(["-I", "dts", "-O", "dtb", "-o", str(result), str(dts)], timeout, "compiling /chosen")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result, out)
    return out
