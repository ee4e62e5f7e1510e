"""``QemuSpec.argv``: the guest-RAM arguments with and without a shared memory backend.

Pure: builds command lines, starts nothing (tests/integration/test_guestram.py starts them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qmp_sdei.qemu.launch import SHARED_RAM_ID, QemuSpec


def _option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def test_default_spec_has_private_ram_and_no_backend(tmp_path: Path) -> None:
    argv = QemuSpec(memory_mb=384, machine_options={"gic-version": "3"}).argv(tmp_path)
    assert _option(argv, "-m") == "384"
    assert _option(argv, "-M") == "virt,gic-version=3"
    assert "-object" not in argv
    assert not any("memory-backend" in arg for arg in argv)


def test_shared_ram_adds_a_memfd_backend_of_the_same_size(tmp_path: Path) -> None:
    spec = QemuSpec(memory_mb=512, machine_options={"virtualization": "on", "gic-version": "3"}, shared_ram=True)
    argv = spec.argv(tmp_path)
    assert _option(argv, "-M") == f"virt,virtualization=on,gic-version=3,memory-backend={SHARED_RAM_ID}"
    assert _option(argv, "-m") == "512"  # QEMU refuses -m differing from the backend's size
    assert _option(argv, "-object") == f"memory-backend-memfd,id={SHARED_RAM_ID},size=512M,share=on"
    assert spec.machine_arg() == _option(argv, "-M")
    assert spec.memory_args() == ["-m", "512", "-object", _option(argv, "-object")]


def test_shared_ram_follows_a_changed_memory_size(tmp_path: Path) -> None:
    spec = dataclasses.replace(QemuSpec(shared_ram=True), memory_mb=2048)
    argv = spec.argv(tmp_path)
    assert _option(argv, "-m") == "2048"
    assert "size=2048M" in _option(argv, "-object")


def test_machine_options_are_not_changed_by_shared_ram(tmp_path: Path) -> None:
    options = {"virtualization": "on"}
    spec = QemuSpec(machine_options=options, shared_ram=True)
    spec.argv(tmp_path)
    assert options == {"virtualization": "on"}
    assert spec.machine_options == {"virtualization": "on"}  # a DTB dump's spec copies these


def test_shared_ram_in_a_named_file(tmp_path: Path) -> None:
    ram = tmp_path / "odd,name" / "vm1.ram"
    spec = QemuSpec(memory_mb=256, shared_ram=True, shared_ram_path=ram)
    argv = spec.argv(tmp_path)
    assert _option(argv, "-M") == f"virt,memory-backend={SHARED_RAM_ID}"
    # QEMU's option syntax: a comma inside a value is written twice
    mem_path = str(ram).replace(",", ",,")
    backend = f"memory-backend-file,id={SHARED_RAM_ID},size=256M,mem-path={mem_path},share=on,discard-data=on"
    assert _option(argv, "-object") == backend


def test_a_ram_path_alone_changes_nothing(tmp_path: Path) -> None:
    argv = QemuSpec(shared_ram_path=tmp_path / "vm1.ram").argv(tmp_path)
    assert "-object" not in argv
