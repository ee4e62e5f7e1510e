"""qemu/guestram.py without QEMU: this test process plays QEMU with memfds of its own.

The search reads the same /proc files it reads of a QEMU (fds, memory maps), so a memfd this
process maps shared stands for a ``share=on`` backend and one it maps privately for ``share=off``.
tests/integration/test_guestram.py does the same against a real QEMU.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qmp_sdei.errors import QemuError, SharedRamUnavailable
from qmp_sdei.qemu.guestram import (
    RAM_BASE,
    map_guest_ram,
    map_guest_ram_file,
    prepare_guest_ram_file,
    qemu_pid_of_thread,
)

MB = 3  # an odd size no other file of this process has
SIZE = MB << 20
MAGIC_AT = RAM_BASE + 0x10_0000
MAGIC = b"qsdei-unit-magic"


@contextmanager
def fake_ram(*, shared: bool = True, magic: bytes = MAGIC, size: int = SIZE) -> Iterator[mmap.mmap]:
    """A memfd of ``size`` bytes, mapped by this process like QEMU maps its RAM backend."""
    fd = os.memfd_create("qsdei-unit-ram")
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, magic, MAGIC_AT - RAM_BASE)  # the file's content, which QEMU's "boot" put there
        ram = mmap.mmap(fd, size, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
        try:
            yield ram
        finally:
            ram.close()
    finally:
        os.close(fd)


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sum(1 for _ in maps)


@contextmanager
def nothing_leaks() -> Iterator[None]:
    fds, maps = open_fds(), mappings()
    yield
    assert open_fds() == fds
    assert mappings() == maps


def test_pid_of_the_main_thread_and_of_another_thread() -> None:
    assert qemu_pid_of_thread(threading.get_native_id()) == os.getpid()
    found: list[int] = []
    worker = threading.Thread(target=lambda: found.append(qemu_pid_of_thread(threading.get_native_id())))
    worker.start()
    worker.join()
    assert found == [os.getpid()]


def test_pid_of_a_thread_that_does_not_exist() -> None:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as limit:
        never = int(limit.read())  # thread ids are always below pid_max
    with pytest.raises(SharedRamUnavailable, match=rf"no thread {never}"):
        qemu_pid_of_thread(never)


def test_shared_ram_is_found_and_writes_reach_the_owner() -> None:
    with fake_ram() as ram, map_guest_ram(os.getpid(), MB, MAGIC_AT, 64, magic=(MAGIC_AT, MAGIC)) as window:
        assert (window.base, window.size, len(window.buffer)) == (MAGIC_AT, 64, 64)
        assert bytes(window.buffer[: len(MAGIC)]) == MAGIC
        window.buffer[32:36] = b"ping"
        offset = MAGIC_AT - RAM_BASE
        assert ram[offset + 32 : offset + 36] == b"ping"  # the owner's own mapping sees it
        ram[offset + 40 : offset + 44] = b"pong"
        assert bytes(window.buffer[40:44]) == b"pong"
    assert window.closed


def test_an_unaligned_window_is_exactly_what_was_asked() -> None:
    with fake_ram(), map_guest_ram(os.getpid(), MB, MAGIC_AT + 5, 7) as window:
        assert bytes(window.buffer) == MAGIC[5:12]
        assert window.buffer.readonly is False


def test_a_window_at_the_end_of_ram() -> None:
    end = RAM_BASE + SIZE
    with fake_ram(), map_guest_ram(os.getpid(), MB, end - 8, 8) as window:
        window.buffer[:] = b"lastbyte"
        assert bytes(window.buffer) == b"lastbyte"


def test_private_ram_is_refused_even_with_the_magic_in_the_file() -> None:
    # MAP_PRIVATE: the file holds the magic (written before), but the owner's later writes would
    # land in private pages; the search looks at how the owner maps the file, not only its bytes.
    with (
        fake_ram(shared=False),
        nothing_leaks(),
        pytest.raises(SharedRamUnavailable, match="maps it privately") as caught,
    ):
        map_guest_ram(os.getpid(), MB, MAGIC_AT, 16, magic=(MAGIC_AT, MAGIC))
    assert "share=on" in str(caught.value) and "qemu-args" in str(caught.value)


def test_private_writes_never_reach_the_file() -> None:
    """What share=off means for the magic check: a write through a private mapping stays there."""
    with fake_ram(shared=False, magic=b"\0" * len(MAGIC)) as ram, nothing_leaks():
        ram[MAGIC_AT - RAM_BASE : MAGIC_AT - RAM_BASE + len(MAGIC)] = MAGIC
        with pytest.raises(SharedRamUnavailable, match=r"bytes at 0x40100000 differ"):
            map_guest_ram(os.getpid(), MB, MAGIC_AT, 16, magic=(MAGIC_AT, MAGIC))


def test_wrong_magic_is_refused_and_leaves_nothing_open() -> None:
    with (
        fake_ram(),
        nothing_leaks(),
        pytest.raises(SharedRamUnavailable, match=r"differ from the expected") as caught,
    ):
        map_guest_ram(os.getpid(), MB, MAGIC_AT, 16, magic=(MAGIC_AT, b"another-magic!!!"))
    assert isinstance(caught.value, QemuError)  # one tree: callers may catch QEMU problems as one


def test_the_magic_picks_one_of_several_files_of_the_size() -> None:
    with fake_ram(magic=b"something-else!!"), fake_ram() as ram, nothing_leaks():
        with pytest.raises(SharedRamUnavailable, match=r"2 files .* could be"):
            map_guest_ram(os.getpid(), MB, MAGIC_AT, 16)
        with map_guest_ram(os.getpid(), MB, MAGIC_AT, 16, magic=(MAGIC_AT, MAGIC)) as window:
            window.buffer[:4] = b"mine"
            assert ram[MAGIC_AT - RAM_BASE : MAGIC_AT - RAM_BASE + 4] == b"mine"


def test_no_file_of_the_size() -> None:
    with (
        fake_ram(),
        nothing_leaks(),
        pytest.raises(SharedRamUnavailable, match=rf"no memory backend of {MB + 2} MiB .* guest RAM is private"),
    ):
        map_guest_ram(os.getpid(), MB + 2, MAGIC_AT, 16)


def test_a_process_that_does_not_exist() -> None:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as limit:
        never = int(limit.read())
    with nothing_leaks(), pytest.raises(SharedRamUnavailable, match=rf"no process {never}"):
        map_guest_ram(never, MB, MAGIC_AT, 16)


@pytest.mark.parametrize(
    ("start", "length"),
    [(RAM_BASE - 1, 16), (RAM_BASE, 0), (RAM_BASE + SIZE - 8, 9), (RAM_BASE + SIZE, 1), (0, 16)],
    ids=["below", "empty", "past-end", "at-end", "zero"],
)
def test_a_window_outside_ram_is_refused_before_looking(start: int, length: int) -> None:
    with nothing_leaks(), pytest.raises(ValueError, match="not inside guest RAM"):
        map_guest_ram(os.getpid(), MB, start, length)


def test_a_magic_outside_ram_is_refused() -> None:
    with pytest.raises(ValueError, match="magic"):
        map_guest_ram(os.getpid(), MB, MAGIC_AT, 16, magic=(RAM_BASE + SIZE - 2, b"abcd"))


def test_close_is_idempotent_and_a_sliced_view_keeps_the_pages_until_released() -> None:
    with fake_ram():
        maps = mappings()
        window = map_guest_ram(os.getpid(), MB, MAGIC_AT, 16)
        assert mappings() == maps + 1
        part = window.buffer[:4]
        window.close()
        window.close()
        assert window.closed
        with pytest.raises(ValueError, match="released"):
            window.buffer[0]  # released: using it is an error, not a crash
        assert bytes(part) == MAGIC[:4]  # still mapped under the caller's view
        part.release()
        assert mappings() == maps  # gone with the last view


def as_nobody(attempt: Callable[[], object]) -> str:
    """Run ``attempt`` in a child that became ``nobody``; what it raised, as "Type: message"."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        message = "no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            attempt()
        except BaseException as err:  # reported, never raised in the fork
            message = f"{type(err).__name__}: {err}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        message = report.read().decode()
    os.waitpid(child, 0)
    return message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_process_of_another_user_is_refused() -> None:
    """A child that became ``nobody`` looks at this (root's) process: not ours to open."""
    owner = os.getpid()
    message = as_nobody(lambda: map_guest_ram(owner, MB, MAGIC_AT, 16).close())
    assert message.startswith("SharedRamUnavailable: "), message
    assert f"QEMU {owner}'s open files" in message and "not ours" in message


def test_close_with_a_ctypes_object_on_the_buffer() -> None:
    with fake_ram() as ram:
        maps = mappings()
        window = map_guest_ram(os.getpid(), MB, MAGIC_AT, 16)
        word = ctypes.c_uint32.from_buffer(window.buffer, 4)
        window.close()
        assert window.closed
        word.value = 0x6B6F6F6C  # still mapped: the write reaches the RAM
        assert ram[MAGIC_AT - RAM_BASE + 4 : MAGIC_AT - RAM_BASE + 8] == b"look"
        del word
        assert mappings() == maps


# ---- a RAM file named by path ([conduit] guest_ram): no /proc of QEMU involved ------------------


def ram_file(tmp_path: Path, *, magic: bytes = MAGIC, size: int = SIZE) -> Path:
    """A file as QEMU's memory-backend-file,mem-path=... leaves it, the guest's magic in it."""
    path = tmp_path / "vm.ram"
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MAGIC_AT - RAM_BASE)
        f.write(magic)
    return path


def test_a_ram_file_is_mapped_by_path_and_writes_reach_it(tmp_path: Path) -> None:
    path = ram_file(tmp_path)
    with nothing_leaks():
        with map_guest_ram_file(path, MB, MAGIC_AT, 64, magic=(MAGIC_AT, MAGIC)) as window:
            assert bytes(window.buffer[: len(MAGIC)]) == MAGIC
            window.buffer[32:36] = b"ping"
            assert str(path) in repr(window)
        with open(path, "rb") as f:
            f.seek(MAGIC_AT - RAM_BASE + 32)
            assert f.read(4) == b"ping"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no guest RAM file"),
        ("directory", "Is a directory"),
        ("device", "not a regular file"),
        ("size", "not the VM's 3 MiB"),
        ("magic", "does not hold the expected bytes"),
    ],
)
def test_a_ram_file_that_is_not_the_vms_is_refused_and_leaves_nothing_open(
    tmp_path: Path, setup: str, message: str
) -> None:
    if setup == "size":
        path = ram_file(tmp_path, size=SIZE + 4096)
    elif setup == "magic":
        path = ram_file(tmp_path, magic=b"something-else!!")
    else:
        path = {"missing": tmp_path / "nothing-here", "directory": tmp_path, "device": Path("/dev/null")}[setup]
    with nothing_leaks(), pytest.raises(SharedRamUnavailable, match=message):
        map_guest_ram_file(path, MB, MAGIC_AT, 64, magic=(MAGIC_AT, MAGIC))


def test_a_ram_file_outside_the_window_checks_is_refused_before_opening(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not inside guest RAM"):
        map_guest_ram_file(tmp_path / "never-opened", MB, RAM_BASE + SIZE, 8)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_ram_file_the_sidecar_may_not_write_is_refused(tmp_path: Path) -> None:
    """As the unit's own user would see a file QEMU created 0644 under its user."""
    path = ram_file(tmp_path)
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    text = as_nobody(lambda: map_guest_ram_file(path, MB, MAGIC_AT, 16).close())
    assert text.startswith("SharedRamUnavailable: ") and "read and write access" in text, text


def test_a_missing_ram_file_is_created_empty_and_group_writable(tmp_path: Path) -> None:
    path = tmp_path / "vm.ram"
    old = os.umask(0o077)  # a strict umask must not take the group's access away
    try:
        assert prepare_guest_ram_file(path) is True
    finally:
        os.umask(old)
    st = path.stat()
    assert st.st_size == 0 and st.st_mode & 0o777 == 0o660


def test_an_existing_ram_file_is_left_as_it_is(tmp_path: Path) -> None:
    """A running QEMU may be using it (the sidecar restarted): same file, same bytes, same mode."""
    path = ram_file(tmp_path)
    path.chmod(0o600)
    before = path.stat()
    assert prepare_guest_ram_file(path) is False
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mode, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mode, before.st_mtime_ns,
    )  # fmt: skip


def test_a_ram_file_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SharedRamUnavailable, match=r"cannot create the guest RAM file .*No such file or directory"):
        prepare_guest_ram_file(tmp_path / "no-such-dir" / "vm.ram")
