"""Build the bare-metal aarch64 test guest, find its symbols, and pick loopback ports for gdbstubs.

Also the bare-metal guest's VM (:func:`guest_vm`) and the sidecar config its step table assumes
(:func:`config_doc`), shared by every test that serves it with the whole sidecar.

The guest sources live in ``tests/guests/baremetal/``. Builds are cached by a hash of the sources,
the compiler flags and the compiler version, so every test after the first reuses the ELF; the
output is written to a temporary name and renamed, so concurrent test runs never see half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qmp_sdei.conduit.el2 import El2Conduit, probe_stub
from qmp_sdei.conduit.gdbstub import GdbstubConduit, SdeiPort
from qmp_sdei.conduit.rsp import RspClient
from qmp_sdei.conduit.service import map_stub_areas
from qmp_sdei.errors import ConduitError, QemuError
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec

GUEST_DIR = Path(__file__).resolve().parent.parent / "guests" / "baremetal"
CROSS = "aarch64-linux-gnu-"
CFLAGS = [
    "-O2", "-ffreestanding", "-nostdlib", "-fno-builtin", "-mgeneral-regs-only", "-static", "-no-pie",
    # The MMU stays off, so all data accesses are Device memory, where unaligned accesses fault.
    "-mstrict-align",
    "-Wall", "-Wextra", "-Werror",
]  # fmt: skip
SOURCES = ("start.S", "guest.c")
COMMON_DIR = GUEST_DIR.parent / "common"
LINKER_SCRIPT = "link.ld"


def build_baremetal_guest(outdir: Path) -> Path:
    """Compile the guest into ``outdir`` (reusing an identical earlier build) and return the ELF path."""
    return build_guest_dir(GUEST_DIR, outdir)


def elf_symbols(elf: Path) -> dict[str, int]:
    """Symbol name -> address, from ``nm`` (binutils comes with the cross compiler)."""
    out = subprocess.run([f"{CROSS}nm", str(elf)], capture_output=True, text=True, check=True).stdout
    symbols: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return symbols


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def connect_gdbstub(port: int, timeout: float = 30.0) -> RspClient:
    """Connect to a gdbstub QEMU is still bringing up.

    QEMU creates its QMP sockets (which ``QemuProcess.start`` waits for) before it listens on the
    gdb port, so the first attempts may be refused. Probing with a plain connect is not an option:
    every gdbstub connection pauses a running VM, so the real client retries instead.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await RspClient.connect("127.0.0.1", port, timeout=timeout)
        except ConduitError as err:
            if not isinstance(err.__cause__, ConnectionRefusedError):
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.02)  # nothing to wait on: QEMU gives no signal when the port is up


DEFERRAL_GUEST_DIR = GUEST_DIR.parent / "deferral"


def build_guest_dir(guest_dir: Path, outdir: Path, sources: tuple[str, ...] = SOURCES) -> Path:
    """Compile the guest in ``guest_dir`` (``sources`` + ``link.ld``) like the bare-metal one.

    Same flags, same cache scheme: the ELF is named by a hash of the sources, flags and compiler,
    and written under a temporary name first, so concurrent runs share one build safely.
    """
    digest = hashlib.sha256()
    for name in (*sources, LINKER_SCRIPT):
        digest.update(name.encode() + b"\0" + (guest_dir / name).read_bytes() + b"\0")
    for header in sorted(COMMON_DIR.iterdir()):  # what every guest includes
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    digest.update(" ".join(CFLAGS).encode())
    version = subprocess.run([f"{CROSS}gcc", "--version"], capture_output=True, check=True, text=True).stdout
    digest.update(version.encode())
    outdir.mkdir(parents=True, exist_ok=True)
    elf = outdir / f"{guest_dir.name}-{digest.hexdigest()[:16]}.elf"
    if elf.exists():
        return elf
    fd, tmp_name = tempfile.mkstemp(prefix=f".{guest_dir.name}-", suffix=".elf", dir=outdir)
    os.close(fd)
    try:
        result = subprocess.run(
            [f"{CROSS}gcc", *CFLAGS, "-T", str(guest_dir / LINKER_SCRIPT), "-o", tmp_name,
             *(str(guest_dir / s) for s in sources)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"building the guest in {guest_dir} failed:\n{result.stderr}")
        os.replace(tmp_name, elf)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return elf


LOOP_GUEST_DIR = GUEST_DIR.parent / "loop"


def build_guest_el2(guest_dir: Path, outdir: Path, sources: tuple[str, ...] = SOURCES) -> tuple[Path, Path]:
    """The guest in ``guest_dir`` linked where the EL2 stub enters a kernel: its ELF (for symbols)
    and the raw image for ``-device loader`` (see :func:`qmp_sdei.stub.qemu_args`)."""
    from qmp_sdei import stub  # noqa: PLC0415

    outdir.mkdir(parents=True, exist_ok=True)
    script = (guest_dir / LINKER_SCRIPT).read_text().replace("0x40080000", f"{stub.KERNEL_ADDR:#x}")
    linker = outdir / f"link-{guest_dir.name}-el2.ld"
    linker.write_text(script)
    elf, raw = outdir / f"{guest_dir.name}-el2.elf", outdir / f"{guest_dir.name}-el2.bin"
    subprocess.run(
        [f"{CROSS}gcc", *CFLAGS, "-T", str(linker), "-o", str(elf), *(str(guest_dir / s) for s in sources)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run([f"{CROSS}objcopy", "-O", "binary", str(elf), str(raw)], check=True)
    return elf, raw


def build_loop_guest_el2(outdir: Path) -> Path:
    """The loop guest (``tests/guests/loop``, also bench/conduit.py's) as a raw image for the EL2 stub."""
    return build_guest_el2(LOOP_GUEST_DIR, outdir, ("start.S", "loop.c"))[1]


def el2_spec(
    image: Path, *, smp: int = 1, memory_mb: int = 256, shared_ram: bool = True, ram_file: Path | None = None
) -> QemuSpec:
    """A VM that boots the raw ``image`` through the EL2 stub, its RAM shared (the stub's mailbox),
    in a memfd or in ``ram_file``."""
    from qmp_sdei import stub  # noqa: PLC0415

    return QemuSpec(
        smp=smp, memory_mb=memory_mb, machine_options={"virtualization": "on", "gic-version": "3"}, paused=True,
        shared_ram=shared_ram, shared_ram_path=ram_file,
        extra_args=("-kernel", str(stub.STUB_ELF),
                    "-device", f"loader,file={image},addr={stub.KERNEL_ADDR:#x},force-raw=on"),
    )  # fmt: skip


def el2_conduit(
    owner: SdeiPort, timeout: float, *, mailbox: bool = True, conduit_class: type[El2Conduit] | None = None
) -> Callable[[RspClient, QemuProcess], Awaitable[GdbstubConduit]]:
    """A ``build`` for :func:`conduit_on_gdbstub`: the EL2 conduit, answering through the stub's
    mailbox in the VM's shared RAM (``mailbox``; the VM needs ``shared_ram``)."""

    async def build(rsp: RspClient, vm: QemuProcess) -> GdbstubConduit:
        layout = await probe_stub(rsp)
        assert layout is not None, "the EL2 stub is not in guest memory"
        ram = None
        if mailbox:  # through the RAM file the VM names, else through QEMU's open files
            assert vm.process is not None
            ram = map_stub_areas(vm.spec.shared_ram_path or vm.process.pid, vm.spec.memory_mb, layout)
        return (conduit_class or El2Conduit)(rsp, owner, layout, timeout=timeout, ram=ram)

    return build


def build_deferral_guest(outdir: Path) -> Path:
    """The deferred-delivery guest (``tests/guests/deferral``): vCPU 0 waits in EL1t and EL0."""
    return build_guest_dir(DEFERRAL_GUEST_DIR, outdir)


async def start_qemu_with_gdbstub(spec: QemuSpec, workdir: Path, attempts: int = 3) -> tuple[QemuProcess, int]:
    """Start ``spec`` with a gdbstub on a free loopback port; returns the started QEMU and the port.

    The port is free when chosen but another process may bind it before QEMU does, so a failed
    start is retried on a new port.
    """
    for attempt in range(attempts):
        port = free_port()
        vm = QemuProcess(dataclasses.replace(spec, gdb=f"tcp:127.0.0.1:{port}"), workdir / f"qemu{attempt}")
        try:
            await vm.start()
        except QemuError:
            await vm.stop()
            continue
        return vm, port
    raise QemuError("could not start QEMU with a gdbstub on a free port")


@contextlib.asynccontextmanager
async def conduit_on_gdbstub(
    spec: QemuSpec,
    workdir: Path,
    owner: SdeiPort,
    trap_sites: list[int],
    timeout: float,
    *,
    build: Callable[[RspClient, QemuProcess], Awaitable[GdbstubConduit]] | None = None,
) -> AsyncIterator[tuple[QemuProcess, GdbstubConduit, asyncio.Task[None]]]:
    """QEMU started with a gdbstub, and a bare :class:`GdbstubConduit` serving it for ``owner``
    (or the conduit ``build`` makes on the gdbstub's connection, e.g. an EL2 one).

    Yields the VM, the started conduit and its running ``run()`` task; the conduit is closed (or
    its connection, if ``run()`` already ended) and QEMU stopped on exit.
    """
    vm, port = await start_qemu_with_gdbstub(spec, workdir)
    try:
        rsp = await connect_gdbstub(port, timeout)
        try:
            conduit = (
                await build(rsp, vm) if build is not None else GdbstubConduit(rsp, owner, trap_sites, timeout=timeout)
            )
        except BaseException:
            await rsp.close()
            raise
        await conduit.start()
        run = asyncio.create_task(conduit.run(), name="conduit.run")
        try:
            yield vm, conduit, run
        finally:
            if not run.done():
                await conduit.close()
            else:
                await conduit.rsp.close()
    finally:
        await vm.stop()


def cached_build_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a session fixture builds a guest: pytest's cache survives runs, so builds are reused."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)


#: the VM name :func:`config_doc` gives and the guest's step table expects in status replies
GUEST_VM_NAME = "sidecar-conduit-test"
GUEST_TIMEOUT = 60.0  # per wait: TCG on a busy 2-core host


def config_doc(vm: QemuProcess, state_dir: Path, elf: Path, *, start_vm: bool) -> dict[str, Any]:
    """The bare-metal guest's catalogue and pins (what test_baremetal_guest.EXPECTED_X0 assumes)."""
    return {
        "vm": {"name": GUEST_VM_NAME, "state_dir": str(state_dir)},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": GUEST_TIMEOUT},
        "sdei": {
            "version": "1.1",
            "profile": "tf-a",
            "bind_slots": [3, 3],
            "events": [
                {"number": 1000},
                {"number": 1001, "priority": "critical"},
                {"number": 2000, "type": "shared"},
            ],
        },
        "psci": {"version": "1.0"},
        "conduit": {"enabled": True, "elf": str(elf), "start_vm": start_vm},
        "log": {"level": "info", "format": "text"},
    }


@contextlib.asynccontextmanager
async def guest_vm(tmp_path: Path, elf: Path) -> AsyncIterator[QemuProcess]:
    """The bare-metal guest on 2 vCPUs, held by -S, no gdbstub (the sidecar starts one over QMP)."""
    vm = QemuProcess(QemuSpec(smp=2, kernel=elf, paused=True, name=GUEST_VM_NAME), tmp_path / "vm")
    try:
        await asyncio.wait_for(vm.start(), GUEST_TIMEOUT)
        yield vm
    finally:
        await vm.stop()
