"""Map a window of a running QEMU's guest RAM into this process, through QEMU's own RAM file.

The EL2 stub's mailbox lives in guest RAM; to answer it without stopping the VM the sidecar must
read and write that RAM while the guest runs. That is possible when QEMU backs guest RAM with a
file it maps shared: ``-object memory-backend-memfd,...,share=on`` with ``-M virt,memory-backend=``
(:attr:`qmp_sdei.qemu.launch.QemuSpec.shared_ram`, printed by ``qmp-sdei qemu-args``), or libvirt's
``<memoryBacking>`` with a memfd source and shared access. The file is then reachable through
``/proc/<pid>/fd``; mapping it ``MAP_SHARED`` gives this process the very pages the guest uses.

QEMU does not say which of its file descriptors is the RAM, so :func:`map_guest_ram` looks at all
of them: a regular file of exactly the VM's RAM size, which QEMU itself maps shared (its
``/proc/<pid>/maps``: a ``share=off`` backend is mapped privately and the guest's writes never
reach the file), and, when the caller gives one, whose bytes at a known guest address are the
expected magic. The search only reads, through read-only mappings; the window is opened
read-write only once one file passed. Linux only.

It must not know what lives in the window (the stub's layout and magic are the caller's), and must
never write to guest RAM on its own: the window is the caller's to write.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import sys
from dataclasses import dataclass
from typing import Final

from qmp_sdei.errors import SharedRamUnavailable
from qmp_sdei.qemu.launch import SHARED_RAM_ID, shared_ram_args

#: Guest physical address of the first byte of RAM on ``-M virt`` (the RAM file's offset 0).
RAM_BASE: Final = 0x4000_0000

_MIB: Final = 1 << 20


def _remedy(memory_mb: int) -> str:
    object_arg = " ".join(shared_ram_args(memory_mb))
    return (
        f"start QEMU with a shared memory backend: {object_arg} and -M virt,...,memory-backend={SHARED_RAM_ID} "
        f"(-m {memory_mb}; qmp-sdei qemu-args prints them), or in libvirt <memoryBacking><source type='memfd'/>"
        "<access mode='shared'/></memoryBacking>"
    )


def qemu_pid_of_thread(thread_id: int) -> int:
    """The process a thread belongs to (its ``Tgid`` in ``/proc/<tid>/status``).

    QMP's ``query-cpus-fast`` gives each vCPU's host *thread* id, not QEMU's process id; all
    threads of QEMU share its file descriptors, but ``/proc/<tid>/fd`` of a thread is not listed
    under ``/proc``, so callers turn a vCPU thread into QEMU's pid first.
    :raise SharedRamUnavailable: no such thread (QEMU exited), or its status cannot be read.
    """
    path = f"/proc/{thread_id}/status"
    try:
        with open(path, encoding="ascii", errors="replace") as status:
            text = status.read()
    except FileNotFoundError as err:
        raise SharedRamUnavailable(f"no thread {thread_id} on this host ({path} is missing): has QEMU exited?") from err
    except OSError as err:
        raise SharedRamUnavailable(f"cannot read {path}: {err.strerror}") from err
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Tgid" and value.strip().isdigit():
            return int(value)
    raise SharedRamUnavailable(f"{path} has no Tgid line: not a Linux /proc status file")


class GuestRamWindow:
    """A writable window of guest RAM, shared with QEMU: the guest sees what is written here at once.

    ``buffer`` covers exactly ``[base, base + size)`` in guest physical addresses (the mapping under
    it is page-aligned and may be a little larger). :meth:`close` unmaps it.
    """

    base: int
    size: int
    buffer: memoryview

    def __init__(self, mapping: mmap.mmap, base: int, size: int, skip: int, source: str) -> None:
        self.base = base
        self.size = size
        #: where the RAM came from, for logs: QEMU's fd and what it points to
        self.source = source
        self._mapping: mmap.mmap | None = mapping
        self._whole = memoryview(mapping)
        self.buffer = self._whole[skip : skip + size]

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def close(self) -> None:
        """Unmap the window (idempotent; never raises).

        A view the caller took of :attr:`buffer` and still holds (a slice, a ``ctypes`` object
        ``from_buffer``) keeps the pages mapped, and valid, until it goes; the mapping goes with
        the last one.
        """
        if self._mapping is None:
            return
        mapping, self._mapping = self._mapping, None
        # BufferError: still exported; freed when the last user lets go.
        with contextlib.suppress(BufferError):
            self.buffer.release()
        with contextlib.suppress(BufferError):
            self._whole.release()
        with contextlib.suppress(BufferError):
            mapping.close()

    def __enter__(self) -> GuestRamWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<GuestRamWindow {self.base:#x}+{self.size:#x} of {self.source} ({state})>"


@dataclass(frozen=True)
class _Candidate:
    """A file among QEMU's fds of the RAM's size."""

    fd: int
    target: str  # what the fd link points to: "/memfd:... (deleted)" or a path
    identity: tuple[int, int]  # (st_dev, st_ino)
    alignment: int  # what a mapping offset must be a multiple of (huge pages on hugetlbfs)
    mapped_shared: bool  # QEMU maps it MAP_SHARED: guest writes reach the file

    @property
    def name(self) -> str:
        return f"fd {self.fd} ({self.target})"


def _check_window(memory_mb: int, start: int, length: int, what: str) -> None:
    end = RAM_BASE + memory_mb * _MIB
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, not {memory_mb}")
    if length <= 0 or start < RAM_BASE or start + length > end:
        raise ValueError(
            f"{what} {start:#x}+{length:#x} is not inside guest RAM [{RAM_BASE:#x}, {end:#x}) of {memory_mb} MiB"
        )


def _alignment(st: os.stat_result) -> int:
    """The mapping granularity of a file: the page size, or its huge page size on hugetlbfs (which
    reports that as the block size; any other power-of-two block size only widens the span)."""
    block = st.st_blksize
    if block > mmap.ALLOCATIONGRANULARITY and block & (block - 1) == 0 and st.st_size % block == 0:
        return block
    return mmap.ALLOCATIONGRANULARITY


def _shared_mappings(pid: int) -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file QEMU maps ``MAP_SHARED`` (an ``s`` in ``/proc/pid/maps``)."""
    found: set[tuple[int, int, int]] = set()
    path = f"/proc/{pid}/maps"
    try:
        with open(path, encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or len(fields[1]) != 4 or fields[1][3] != "s":
                    continue
                major, _, minor = fields[3].partition(":")
                try:
                    found.add((int(major, 16), int(minor, 16), int(fields[4])))
                except ValueError:
                    continue
    except FileNotFoundError as err:
        raise SharedRamUnavailable(f"QEMU process {pid} exited while its memory maps were read") from err
    except OSError as err:
        raise SharedRamUnavailable(
            f"cannot read QEMU {pid}'s memory maps ({path}): {err.strerror}; run the sidecar as QEMU's user"
        ) from err
    return found


def _candidates(pid: int, size: int) -> tuple[list[_Candidate], int]:
    """The regular files of ``size`` bytes among QEMU's fds (one per file), and how many fds were looked at."""
    if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
        raise SharedRamUnavailable(f"no process {pid} on this host (/proc/{pid} is missing): has QEMU exited?")
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError as err:
        raise SharedRamUnavailable(f"QEMU process {pid} exited while its files were listed") from err
    except PermissionError as err:
        raise SharedRamUnavailable(
            f"cannot list QEMU {pid}'s open files ({fd_dir}): permission denied; the process is not ours "
            "(run the sidecar as QEMU's user, or as root)"
        ) from err
    shared = _shared_mappings(pid)
    candidates: list[_Candidate] = []
    seen: set[tuple[int, int]] = set()
    for name in sorted((n for n in names if n.isdigit()), key=int):
        link = f"{fd_dir}/{name}"
        try:
            st = os.stat(link)
            target = os.readlink(link)
        except OSError:
            continue  # closed meanwhile, or a link we cannot follow: not RAM we could map anyway
        identity = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or identity in seen:
            continue
        seen.add(identity)
        mapped_shared = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in shared
        candidates.append(_Candidate(int(name), target, identity, _alignment(st), mapped_shared))
    return candidates, len(names)


def _span(start: int, length: int, alignment: int, file_size: int) -> tuple[int, int]:
    """(file offset, length) of the aligned mapping covering guest ``[start, start + length)``."""
    first = (start - RAM_BASE) // alignment * alignment
    last = min(-(-(start - RAM_BASE + length) // alignment) * alignment, file_size)
    return first, last - first


def _open(pid: int, candidate: _Candidate, flags: int) -> int:
    """Open QEMU's fd afresh (a new open file of the same file), checking it is still that file."""
    path = f"/proc/{pid}/fd/{candidate.fd}"
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != candidate.identity:
            raise SharedRamUnavailable(f"QEMU {pid}'s {candidate.name} changed while it was being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _has_magic(pid: int, candidate: _Candidate, size: int, magic: tuple[int, bytes]) -> bool:
    """Whether the file holds ``magic``'s bytes at its guest address; read through a read-only mapping."""
    fd = _open(pid, candidate, os.O_RDONLY)
    try:
        return _holds(fd, candidate.alignment, size, magic)
    finally:
        os.close(fd)  # a mapping holds its own reference


def _holds(fd: int, alignment: int, size: int, magic: tuple[int, bytes]) -> bool:
    """Whether RAM file ``fd`` holds ``magic``'s bytes at its guest address (a read-only mapping)."""
    addr, expected = magic
    offset, length = _span(addr, len(expected), alignment, size)
    with mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset) as view:
        skip = addr - RAM_BASE - offset
        return view[skip : skip + len(expected)] == expected


def prepare_guest_ram_file(path: str | os.PathLike[str]) -> bool:
    """Create the RAM file at ``path`` empty and group-writable if it is missing; whether it did.

    QEMU creates a missing ``mem-path`` file itself, but readable only by its own user (0644), and
    the sidecar must write it. An empty file QEMU finds instead it opens as it is and grows to the
    VM's size, keeping its owner and mode: created by the sidecar before QEMU starts, in a
    directory both share a group of (the setgid ``/run/qmp-sdei``), it stays writable for both. An
    existing file is never touched: a running QEMU may be using it.
    :raise SharedRamUnavailable: it cannot be created (no such directory, no permission).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
    except FileExistsError:
        return False
    except OSError as err:
        raise SharedRamUnavailable(f"cannot create the guest RAM file {os.fspath(path)!r}: {err.strerror}") from err
    try:
        os.fchmod(fd, 0o660)  # whatever the umask: QEMU's user writes it through the group
    finally:
        os.close(fd)
    return True


def map_guest_ram_file(
    path: str | os.PathLike[str], memory_mb: int, start: int, length: int, *, magic: tuple[int, bytes] | None = None
) -> GuestRamWindow:
    """Map guest physical ``[start, start + length)`` read-write and shared from the RAM file at
    ``path``: QEMU's ``memory-backend-file,mem-path=<path>,share=on``.

    For a sidecar that may not look into QEMU's ``/proc/<pid>`` (another user, another PID
    namespace) but is given the file itself, e.g. on a tmpfs both can reach. Only the file's
    permissions matter then. What cannot be checked from here is that QEMU maps it shared: with
    ``share=off`` the guest's writes stay in QEMU's private copy, so the stub's header is missing
    from the file and this refuses it, or (a file an earlier VM left behind) the guest never sees
    the mailbox and every call keeps stopping the VM, as without it.

    :param magic: as for :func:`map_guest_ram`; without it any file of the right size is taken.
    :raise SharedRamUnavailable: missing, not ours to open read-write, not a regular file, not of
        ``memory_mb`` MiB, or without the magic. Nothing stays open or mapped.
    :raise ValueError: the window or the magic's address is not inside guest RAM.
    """
    _check_window(memory_mb, start, length, "window")
    if magic is not None:
        _check_window(memory_mb, magic[0], len(magic[1]), "magic")
    size = memory_mb * _MIB
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise SharedRamUnavailable(
            f"no guest RAM file {os.fspath(path)!r}: start QEMU with -object "
            f"memory-backend-file,id={SHARED_RAM_ID},size={memory_mb}M,mem-path={os.fspath(path)},share=on"
        ) from err
    except OSError as err:
        raise SharedRamUnavailable(
            f"cannot open the guest RAM file {os.fspath(path)!r} read-write: {err.strerror} (the sidecar's user "
            "needs read and write access to it)"
        ) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SharedRamUnavailable(f"the guest RAM file {os.fspath(path)!r} is not a regular file")
        if st.st_size != size:
            raise SharedRamUnavailable(
                f"the guest RAM file {os.fspath(path)!r} holds {st.st_size} bytes, not the VM's {memory_mb} MiB: "
                "not this VM's memory backend"
            )
        alignment = _alignment(st)
        if magic is not None and not _holds(fd, alignment, size, magic):
            raise SharedRamUnavailable(
                f"the guest RAM file {os.fspath(path)!r} does not hold the expected bytes at {magic[0]:#x}: not the "
                "RAM of a VM booted through the EL2 stub, or QEMU maps it privately (share=off)"
            )
        return _window(fd, alignment, size, start, length, source=os.fspath(path))
    except OSError as err:
        raise SharedRamUnavailable(f"cannot map the guest RAM file {os.fspath(path)!r}: {err.strerror}") from err
    finally:
        os.close(fd)  # the mapping holds its own reference


def map_guest_ram(
    pid: int, memory_mb: int, start: int, length: int, *, magic: tuple[int, bytes] | None = None
) -> GuestRamWindow:
    """Map guest physical ``[start, start + length)`` of QEMU process ``pid`` read-write and shared.

    :param memory_mb: the VM's RAM size (``-m``); QEMU's RAM file is the one of exactly this size.
    :param magic: ``(guest address, bytes)`` the RAM must hold there (e.g. a header the guest wrote);
        only a file that holds them is taken. Without it, exactly one file may qualify.
    :raise SharedRamUnavailable: no shared RAM file of that size (the RAM is private: a plain
        ``-m`` or ``share=off``), none with the magic, more than one to choose from, or the process
        is missing or not ours. Nothing stays open or mapped.
    :raise ValueError: the window or the magic's address is not inside guest RAM.
    """
    _check_window(memory_mb, start, length, "window")
    if magic is not None:
        _check_window(memory_mb, magic[0], len(magic[1]), "magic")
    if not sys.platform.startswith("linux"):
        raise SharedRamUnavailable("mapping QEMU's guest RAM needs Linux (/proc/<pid>/fd)")
    size = memory_mb * _MIB
    candidates, looked_at = _candidates(pid, size)
    if not candidates:
        raise SharedRamUnavailable(
            f"no memory backend of {memory_mb} MiB among QEMU {pid}'s {looked_at} open files: its guest RAM is "
            f"private; {_remedy(memory_mb)}"
        )
    verdicts: list[str] = []
    chosen: list[_Candidate] = []
    for candidate in candidates:
        problems = []
        if not candidate.mapped_shared:
            problems.append("QEMU maps it privately (share=off), so the guest's writes never reach it")
        if magic is not None:
            try:
                matches = _has_magic(pid, candidate, size, magic)
            except (OSError, ValueError, SharedRamUnavailable) as err:
                problems.append(f"cannot be read: {err}")
            else:
                if not matches:
                    problems.append(f"its bytes at {magic[0]:#x} differ from the expected {magic[1][:16].hex()}")
        if problems:
            verdicts.append(f"{candidate.name}: {'; '.join(problems)}")
        else:
            chosen.append(candidate)
    if not chosen:
        raise SharedRamUnavailable(
            f"no shared memory backend of {memory_mb} MiB holding guest RAM among QEMU {pid}'s files "
            f"({'; '.join(verdicts)}); {_remedy(memory_mb)}"
        )
    if len(chosen) > 1:
        names = ", ".join(candidate.name for candidate in chosen)
        raise SharedRamUnavailable(
            f"{len(chosen)} files of QEMU {pid} could be its {memory_mb} MiB of guest RAM ({names}); "
            "give the bytes expected at a known address (magic) to tell them apart"
        )
    return _map(pid, chosen[0], size, start, length)


def _map(pid: int, candidate: _Candidate, size: int, start: int, length: int) -> GuestRamWindow:
    try:
        fd = _open(pid, candidate, os.O_RDWR)
    except OSError as err:
        raise SharedRamUnavailable(
            f"cannot open QEMU {pid}'s guest RAM ({candidate.name}) read-write: {err.strerror}"
        ) from err
    try:
        return _window(fd, candidate.alignment, size, start, length, source=f"QEMU {pid} {candidate.name}")
    except OSError as err:
        raise SharedRamUnavailable(f"cannot map QEMU {pid}'s guest RAM ({candidate.name}): {err.strerror}") from err
    finally:
        os.close(fd)  # the mapping holds its own reference


def _window(fd: int, alignment: int, size: int, start: int, length: int, *, source: str) -> GuestRamWindow:
    """Guest ``[start, start + length)`` of RAM file ``fd`` (``size`` bytes), mapped read-write and
    shared; the fd may be closed afterwards. :raise OSError: the mapping failed."""
    offset, span = _span(start, length, alignment, size)
    mapping = mmap.mmap(fd, span, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    return GuestRamWindow(mapping, start, length, start - RAM_BASE - offset, source)
