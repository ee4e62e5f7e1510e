"""Where the conduit maps the EL2 stub's mailboxes from: ``[conduit] guest_ram`` or QEMU's process.

Pure file work, no QEMU: a file stands for QEMU's ``memory-backend-file`` (the integration test
``test_el2_mailbox.py::test_a_ram_file_named_by_path_serves_the_mailbox`` runs a real one).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qmp_sdei.conduit.service import _guest_ram_mapper
from qmp_sdei.errors import SharedRamUnavailable
from qmp_sdei.qemu.guestram import RAM_BASE, GuestRamWindow
from qmp_sdei.stub import MAGIC, StubLayout

MB = 3
BASE = RAM_BASE + 0x10_0000
LAYOUT = StubLayout(
    base=BASE, percpu_size=0x1000, trap_site=0, resume=0, unexpected=0, percpu=BASE + 0x1000, max_cpus=2,
    idle_poll_us=0, kernel=0, dtb=0, wake_site=0, idle=range(0),
)  # fmt: skip


def stub_ram(tmp_path: Path, magic: bytes = MAGIC) -> Path:
    path = tmp_path / "vm.ram"
    with open(path, "wb") as f:
        f.truncate(MB << 20)
        f.seek(BASE + 8 - RAM_BASE)
        f.write(magic)
    return path


def test_a_named_file_is_mapped_without_knowing_qemus_process(tmp_path: Path) -> None:
    mapper = _guest_ram_mapper(None, MB, stub_ram(tmp_path))
    assert mapper is not None
    window = mapper(LAYOUT)
    try:
        assert isinstance(window, GuestRamWindow)
        assert (window.base, window.size) == (BASE, LAYOUT.areas_end - BASE)
        assert bytes(window.buffer[8:16]) == MAGIC
        assert window.source == str(tmp_path / "vm.ram")
    finally:
        window.close()


def test_a_named_file_without_the_stub_is_refused_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mapper = _guest_ram_mapper(12345, MB, stub_ram(tmp_path, magic=b"NOTSTUB!"))
    assert mapper is not None
    with caplog.at_level(logging.WARNING), pytest.raises(SharedRamUnavailable, match="does not hold the expected"):
        mapper(LAYOUT)  # the file was named: the process is not searched instead
    assert any(r.levelno == logging.WARNING and "[conduit] guest_ram" in r.getMessage() for r in caplog.records)


def test_nothing_to_map_from() -> None:
    assert _guest_ram_mapper(None, MB, None) is None
    assert _guest_ram_mapper(123, 0, Path("/dev/shm/x")) is None  # RAM size unknown
