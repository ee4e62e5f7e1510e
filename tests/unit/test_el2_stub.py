"""The shipped EL2 stub: the checked-in ELF is what its source assembles to, and the header the
sidecar reads from guest memory names the same addresses as the ELF's symbols."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from qmp_sdei import stub
from qmp_sdei.conduit.traps import ElfImage
from qmp_sdei.errors import ConduitError, ConfigError
from qmp_sdei.stub import STUB_BASE, STUB_ELF, StubLayout

STUB_DIR = STUB_ELF.parent


def _image() -> ElfImage:
    return ElfImage(STUB_ELF.read_bytes(), STUB_ELF.name)


def _loaded(image: ElfImage, addr: int, length: int) -> bytes:
    for region in image.regions():
        if region.contains(addr):
            start = addr - region.vaddr
            return bytes(image.region_bytes(region)[start : start + length])
    raise AssertionError(f"{addr:#x} is not loaded by the stub ELF")


def test_header_matches_the_elf_symbols() -> None:
    image = _image()
    symbols = {s.name: s.value for s in image.symbols}
    layout = StubLayout.parse(STUB_BASE, _loaded(image, STUB_BASE, stub.HEADER_SIZE))
    assert symbols["_start"] == STUB_BASE
    assert layout.trap_site == symbols["stub_trap_site"]
    assert layout.resume == symbols["stub_resume"]
    assert layout.unexpected == symbols["stub_unexpected"]
    assert layout.wake_site == symbols["stub_wake_site"]
    assert layout.idle == range(symbols["stub_idle"], symbols["stub_idle_end"])
    assert layout.percpu == symbols["percpu"]
    assert (layout.kernel, layout.dtb) == (stub.KERNEL_ADDR, stub.DTB_ADDR)
    assert layout.percpu_size == 1024 and layout.max_cpus == 64 and layout.idle_poll_us == 1000
    # Everything the stub uses lies in the region the DTB reserves for it.
    end = layout.percpu + layout.max_cpus * layout.percpu_size
    assert STUB_BASE <= layout.trap_site < end <= STUB_BASE + stub.STUB_RESERVED
    # The trap and wake sites are nops the breakpoints sit on.
    nop = (0xD503201F).to_bytes(4, "little")
    assert _loaded(image, layout.trap_site, 4) == nop
    assert _loaded(image, layout.wake_site, 4) == nop


def test_area_rules_agree() -> None:
    layout = StubLayout.parse(STUB_BASE, _loaded(_image(), STUB_BASE, stub.HEADER_SIZE))
    area1 = layout.area_of(0x1)
    assert area1 == layout.percpu + layout.percpu_size
    assert layout.area_of(0x100) == layout.percpu + 16 * layout.percpu_size  # Aff1 = 1
    # With an empty stack (trap site) or a few pushes (idle loop), SP is inside the area's top.
    assert layout.area_below(area1 + layout.percpu_size) == area1
    assert layout.area_below(area1 + layout.percpu_size - 32) == area1


def test_header_refuses_other_memory() -> None:
    with pytest.raises(ConduitError, match="no qmp-sdei EL2 stub"):
        StubLayout.parse(STUB_BASE, b"\0" * stub.HEADER_SIZE)
    header = bytearray(_loaded(_image(), STUB_BASE, stub.HEADER_SIZE))
    header[0x10] = 99
    with pytest.raises(ConduitError, match="header version 99"):
        StubLayout.parse(STUB_BASE, bytes(header))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="aarch64 cross toolchain not installed")
def test_checked_in_elf_is_built_from_the_source(tmp_path: Path) -> None:
    for name in ("el2stub.S", "link.ld", "Makefile", "sdeitab.c", "efi.ld"):
        shutil.copy(STUB_DIR / name, tmp_path / name)
    subprocess.run(["make", "-s", "-C", str(tmp_path)], check=True, capture_output=True)
    # The stub's raw image is what the guest runs: any toolchain must rebuild it byte for byte. The
    # ELF's metadata and the C-built EFI app depend on the toolchain's release, so those are
    # compared only with the reference toolchain (Debian 12's cross gcc 12, which built them).
    version = subprocess.run(
        ["aarch64-linux-gnu-gcc", "-dumpversion"], check=True, capture_output=True, text=True
    ).stdout.strip()
    names = ("el2stub.bin",) + (("el2stub.elf", "sdeitab.efi") if version.split(".")[0] == "12" else ())
    for name in names:
        assert (tmp_path / name).read_bytes() == (STUB_DIR / name).read_bytes(), (
            f"src/qmp_sdei/stub/{name} is stale: run make -C src/qmp_sdei/stub and commit it"
        )


def test_qemu_args_place_the_pieces_where_the_stub_looks(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 100)
    args = stub.qemu_args(Path("/k/Image"), Path("/d/x.dtb"), initrd=initrd)
    assert args[:2] == ["-kernel", str(STUB_ELF)]
    assert f"loader,file=/k/Image,addr={stub.KERNEL_ADDR:#x},force-raw=on" in args
    assert f"loader,file=/d/x.dtb,addr={stub.DTB_ADDR:#x},force-raw=on" in args
    assert f"loader,file={initrd},addr={stub.INITRD_ADDR:#x},force-raw=on" in args
    assert stub.initrd_range(initrd) == (stub.INITRD_ADDR, stub.INITRD_ADDR + 100)


def test_raw_binary_is_the_elf_text() -> None:
    image = _image()
    text = next(r for r in image.regions() if r.vaddr == STUB_BASE)
    assert stub.STUB_BIN.read_bytes() == bytes(image.region_bytes(text))


def test_firmware_boot_places_the_stub_above_the_firmware_memory(tmp_path: Path) -> None:
    base = stub.firmware_stub_base(1024)
    assert base == 0x4000_0000 + (1 << 30) - stub.FIRMWARE_SLOT
    ram_base, size = stub.firmware_memory(1024)
    assert ram_base + size == base  # the firmware and the OS see RAM up to the stub, not beyond
    dtb = tmp_path / "g.dtb"
    dtb.write_bytes(b"\xd0\x0d\xfe\xed" + b"\0" * 60)
    args = stub.firmware_qemu_args(Path("/fw.fd"), dtb, 1024)
    assert args[args.index("-dtb") + 1] == str(dtb)
    assert f"loader,file={stub.STUB_BIN},addr={base:#x},force-raw=on" in args
    # The copy the stub puts over QEMU's (whose /memory QEMU stretches over the stub) before the firmware.
    assert f"loader,file={dtb},addr={base + stub.FIRMWARE_DTB_OFFSET:#x},force-raw=on" in args
    assert stub.STUB_RESERVED <= stub.FIRMWARE_DTB_OFFSET
    assert stub.FIRMWARE_DTB_OFFSET + stub.FIRMWARE_DTB_MAX <= stub.FIRMWARE_SLOT
    assert f"loader,addr={base + 4:#x},cpu-num=0" in args  # _start + 4: the firmware entry
    assert base in stub.probe_addresses() and stub.probe_addresses()[0] == stub.STUB_BASE
    # With the VM's RAM size known (a migration destination attaches inside the downtime): two places.
    assert stub.probe_addresses(1024) == [stub.STUB_BASE, base]


def test_firmware_dtb_room_matches_the_stub() -> None:
    symbols = {s.name: s.value for s in _image().symbols}
    assert symbols["FW_DTB_OFFSET"] == stub.FIRMWARE_DTB_OFFSET
    assert symbols["FW_DTB_MAX"] == stub.FIRMWARE_DTB_MAX
    assert symbols["RAM_BASE"] == stub.RAM_BASE


def test_firmware_boot_refuses_a_dtb_too_large_for_the_slot(tmp_path: Path) -> None:
    dtb = tmp_path / "big.dtb"
    dtb.write_bytes(b"\0" * (stub.FIRMWARE_DTB_MAX + 1))
    with pytest.raises(ConfigError, match="does not fit"):
        stub.firmware_qemu_args(Path("/fw.fd"), dtb, 1024)


def test_acpi_app_is_a_relocatable_efi_application() -> None:
    data = stub.SDEI_ACPI_APP.read_bytes()
    assert data[:2] == b"MZ"
    pe = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe : pe + 4] == b"PE\0\0"
    assert int.from_bytes(data[pe + 4 : pe + 6], "little") == 0xAA64  # machine: arm64
    characteristics = int.from_bytes(data[pe + 22 : pe + 24], "little")
    assert not characteristics & 1, "relocations-stripped flag set: edk2 would only load it at address 0"
    subsystem = int.from_bytes(data[pe + 24 + 68 : pe + 24 + 70], "little")
    assert subsystem == 10  # EFI application


def test_the_idle_loop_takes_a_kick_first_and_knows_kick_enter() -> None:
    """What the conduit looks for (start()) before it enters handlers from an idle stop and wakes
    vCPUs through the GIC: the kick's load before the interrupt check, and the KICK_ENTER compare."""
    from qmp_sdei.conduit.el2 import CMP_KICK_ENTER, LOAD_KICK, MRS_ISR  # noqa: PLC0415

    image = _image()
    layout = StubLayout.parse(STUB_BASE, _loaded(image, STUB_BASE, stub.HEADER_SIZE))
    code = _loaded(image, layout.idle.start, len(layout.idle))
    words = [int.from_bytes(code[i : i + 4], "little") for i in range(0, len(code), 4)]
    assert words.index(LOAD_KICK) < words.index(MRS_ISR)
    assert CMP_KICK_ENTER in words


def test_area_fields_match_the_source() -> None:
    source = (STUB_DIR / "el2stub.S").read_text()
    for name in ("A_KICK", "A_UNPEND", "A_RESUME_FLAGS", "A_TRAP_ELR2", "A_CTX_VALID", "A_DOORBELL"):
        assert f".equ\t{name}, {getattr(stub, name):#x}" in source, name
    assert f".equ\tKICK_ENTER, {stub.KICK_ENTER}" in source
