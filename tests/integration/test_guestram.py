"""qemu/guestram.py against a real, paused QEMU: the sidecar's window onto guest RAM.

QEMU loads a marker into guest RAM (``-device loader``) before anything runs; the window must show
it, and a write through the window must be what QEMU itself reads at that guest address (HMP
``xp``, through QMP's ``human-monitor-command``). Without a shared backend nothing is mapped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmp_sdei.errors import SharedRamUnavailable
from qmp_sdei.qemu.guestram import RAM_BASE, map_guest_ram, qemu_pid_of_thread
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from support.qemu import harness_client, running_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

MB = 256
MARKER_AT = 0x4010_0000
MARKER = b"qsdei-guestram-marker-0123456789"


def loader_args(tmp_path: Path, content: bytes = MARKER, addr: int = MARKER_AT) -> tuple[str, ...]:
    marker = tmp_path / "marker.bin"
    marker.write_bytes(content)
    return ("-device", f"loader,file={marker},addr={addr:#x},force-raw=on")


def qemu_pid(vm: QemuProcess) -> int:
    assert vm.process is not None
    return vm.process.pid


async def read_guest(client: QMPClient, addr: int, words: int) -> bytes:
    """``words`` 64-bit words at guest physical ``addr``, as QEMU reads them (HMP ``xp``)."""
    out = await client.execute("human-monitor-command", {"command-line": f"xp /{words}gx {addr:#x}"})
    assert isinstance(out, str)
    values = re.findall(r"0x([0-9a-f]{16})", out)
    assert len(values) == words, out
    return b"".join(int(v, 16).to_bytes(8, "little") for v in values)


async def wait_until_up(vm: QemuProcess) -> None:
    """Until QEMU answers QMP: its sockets exist before the machine (RAM, loader) is set up."""
    async with harness_client(vm) as client:
        await client.execute("query-status")


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


async def test_the_window_is_qemus_guest_ram(tmp_path: Path) -> None:
    spec = QemuSpec(memory_mb=MB, shared_ram=True, extra_args=loader_args(tmp_path))
    async with running_qemu(tmp_path, spec) as vm, harness_client(vm) as client:
        cpus = await client.execute("query-cpus-fast")
        assert isinstance(cpus, list)
        pid = qemu_pid_of_thread(cpus[0]["thread-id"])  # how the sidecar finds QEMU from QMP
        assert pid == qemu_pid(vm)
        with map_guest_ram(pid, MB, MARKER_AT, 4096, magic=(MARKER_AT, MARKER)) as window:
            assert bytes(window.buffer[: len(MARKER)]) == MARKER  # QEMU's loader wrote it
            assert await read_guest(client, MARKER_AT, 4) == MARKER
            window.buffer[: len(MARKER)] = bytes(reversed(MARKER))
            assert await read_guest(client, MARKER_AT, 4) == bytes(reversed(MARKER))  # QEMU sees our write
            window.buffer[4088:4096] = (0x1122334455667788).to_bytes(8, "little")
            assert await read_guest(client, MARKER_AT + 4088, 1) == (0x1122334455667788).to_bytes(8, "little")


async def test_an_unaligned_window_and_no_magic(tmp_path: Path) -> None:
    spec = QemuSpec(memory_mb=MB, shared_ram=True, extra_args=loader_args(tmp_path))
    async with running_qemu(tmp_path, spec) as vm, harness_client(vm) as client:
        with map_guest_ram(qemu_pid(vm), MB, MARKER_AT + 8, 8) as window:
            assert (window.base, window.size) == (MARKER_AT + 8, 8)
            assert bytes(window.buffer) == MARKER[8:16]
            window.buffer[:] = b"EIGHTBYT"
            assert (await read_guest(client, MARKER_AT, 2))[8:] == b"EIGHTBYT"


async def test_a_disk_image_of_the_ram_size_is_not_taken_for_ram(tmp_path: Path) -> None:
    """QEMU opens a disk image read-write but never maps it: only the shared RAM file qualifies."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as image:
        image.truncate(MB << 20)
    drive = ("-drive", f"if=none,id=d0,format=raw,file={disk}")
    spec = QemuSpec(memory_mb=MB, shared_ram=True, extra_args=(*loader_args(tmp_path), *drive))
    async with running_qemu(tmp_path, spec) as vm:
        await wait_until_up(vm)
        assert any(os.path.realpath(f"/proc/{qemu_pid(vm)}/fd/{fd}") == str(disk) for fd in os.listdir(
            f"/proc/{qemu_pid(vm)}/fd"
        )), "QEMU did not open the disk image: the test would prove nothing"  # fmt: skip
        with map_guest_ram(qemu_pid(vm), MB, MARKER_AT, 64) as window:
            assert bytes(window.buffer[: len(MARKER)]) == MARKER


async def test_a_private_backend_fails_the_magic_check(tmp_path: Path) -> None:
    """share=off: QEMU's loader wrote the marker into private pages, the memfd itself stays zero."""
    private = ("-object", f"memory-backend-memfd,id=priv,size={MB}M,share=off")
    spec = QemuSpec(
        memory_mb=MB, machine_options={"memory-backend": "priv"}, extra_args=(*private, *loader_args(tmp_path))
    )
    async with running_qemu(tmp_path, spec) as vm, harness_client(vm) as client:
        assert await read_guest(client, MARKER_AT, 4) == MARKER  # the guest does have it
        fds = open_fds()
        with pytest.raises(SharedRamUnavailable) as caught:
            map_guest_ram(qemu_pid(vm), MB, MARKER_AT, 64, magic=(MARKER_AT, MARKER))
        message = str(caught.value)
        assert f"bytes at {MARKER_AT:#x} differ" in message
        assert "privately" in message and "share=on" in message and "qemu-args" in message
        with pytest.raises(SharedRamUnavailable, match="privately"):  # and without a magic
            map_guest_ram(qemu_pid(vm), MB, MARKER_AT, 64)
        assert open_fds() == fds


async def test_plain_memory_has_no_backend_to_map(tmp_path: Path) -> None:
    async with running_qemu(tmp_path, QemuSpec(memory_mb=MB, extra_args=loader_args(tmp_path))) as vm:
        await wait_until_up(vm)
        fds = open_fds()
        with pytest.raises(SharedRamUnavailable, match=rf"no memory backend of {MB} MiB .* guest RAM is private"):
            map_guest_ram(qemu_pid(vm), MB, MARKER_AT, 64, magic=(MARKER_AT, MARKER))
        assert open_fds() == fds


async def test_the_wrong_size_finds_nothing(tmp_path: Path) -> None:
    spec = QemuSpec(memory_mb=MB, shared_ram=True, extra_args=loader_args(tmp_path))
    async with running_qemu(tmp_path, spec) as vm:
        await wait_until_up(vm)
        fds = open_fds()
        with pytest.raises(SharedRamUnavailable, match=rf"no memory backend of {2 * MB} MiB"):
            map_guest_ram(qemu_pid(vm), 2 * MB, MARKER_AT, 64)
        assert open_fds() == fds


async def test_a_qemu_that_exited(tmp_path: Path) -> None:
    spec = QemuSpec(memory_mb=MB, shared_ram=True)
    async with running_qemu(tmp_path, spec) as vm:
        await wait_until_up(vm)
        pid = qemu_pid(vm)
        await vm.stop()
        with pytest.raises(SharedRamUnavailable, match=rf"no process {pid}"):
            map_guest_ram(pid, MB, RAM_BASE, 64)
