"""Trap-site discovery: ELF guests built on the spot, and synthetic arm64 Images with fake kallsyms."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qmp_sdei.conduit import traps
from qmp_sdei.conduit.traps import (
    HVC_0,
    SMC_0,
    GuestImageError,
    Kallsyms,
    elf_trap_sites,
    kernel_has_dt_sdei_fix,
    linux_text_base,
    linux_trap_sites,
    merge_sites,
    scan_words,
)

CC = "aarch64-linux-gnu-gcc"
LINK_ADDRESS = 0x40080000

# Known sites: _start+4 (hvc), bare_label+0 (smc, an unsized asm label), with_pool+4 (hvc).
# Decoys: "hvc #1" (another immediate), a literal-pool constant equal to the hvc encoding inside
# with_pool, a .rodata word, and an unaligned copy of the encoding in .rodata.
GUEST_ASM = r"""
    .text
    .global _start
    .type _start, %function
_start:
    nop
    hvc #0
    b bare_label
    .size _start, . - _start

    .global bare_label
bare_label:
    smc #0
    hvc #1
    nop

    .global with_pool
    .type with_pool, %function
with_pool:
    ldr x1, =0xd4000002d4000002
    hvc #0
    ret
    .ltorg
    .size with_pool, . - with_pool

    .global after
    .type after, %function
after:
    ret
    .size after, . - after

    .section .rodata
    .word 0xd4000002
    .byte 0
    .word 0xd4000002
"""

needs_cc = pytest.mark.skipif(shutil.which(CC) is None, reason=f"{CC} not installed (gcc-aarch64-linux-gnu)")


def _symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["aarch64-linux-gnu-nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return {
        name: int(addr, 16) for addr, _, name in (line.split() for line in out.splitlines() if line.count(" ") == 2)
    }


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("elf")
    (work / "guest.S").write_text(GUEST_ASM)
    elf = work / "guest.elf"
    subprocess.run(
        [
            CC,
            "-nostdlib",
            "-static",
            "-no-pie",
            f"-Wl,-Ttext={LINK_ADDRESS:#x}",
            "-o",
            str(elf),
            str(work / "guest.S"),
        ],
        check=True,
        capture_output=True,
    )
    return elf


@needs_cc
def test_whole_elf_finds_exactly_the_instructions(guest_elf: Path) -> None:
    sym = _symbols(guest_elf)
    assert sym["_start"] == LINK_ADDRESS
    expected = [sym["_start"] + 4, sym["bare_label"], sym["with_pool"] + 4]
    assert expected == [LINK_ADDRESS + 4, LINK_ADDRESS + 12, LINK_ADDRESS + 28]
    assert elf_trap_sites(guest_elf) == expected


@needs_cc
def test_named_symbols_only(guest_elf: Path) -> None:
    sym = _symbols(guest_elf)
    assert elf_trap_sites(guest_elf, ["_start"]) == [sym["_start"] + 4]
    # An unsized label extends to the next symbol, so it finds its smc but not with_pool's hvc.
    assert elf_trap_sites(guest_elf, ["bare_label"]) == [sym["bare_label"]]
    # The literal pool inside with_pool holds the hvc encoding twice, and is skipped.
    assert elf_trap_sites(guest_elf, ["with_pool"]) == [sym["with_pool"] + 4]
    assert elf_trap_sites(guest_elf, ["after"]) == []


@needs_cc
def test_filter_by_instruction(guest_elf: Path) -> None:
    sym = _symbols(guest_elf)
    assert elf_trap_sites(guest_elf, insns={SMC_0}) == [sym["bare_label"]]
    assert elf_trap_sites(guest_elf, ["_start", "bare_label"], insns={HVC_0}) == [sym["_start"] + 4]


@needs_cc
def test_stripped_elf_scans_sections_without_mapping_symbols(guest_elf: Path, tmp_path: Path) -> None:
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["aarch64-linux-gnu-strip", "-o", str(stripped), str(guest_elf)], check=True)
    sites = elf_trap_sites(stripped)
    # Without $d marks the pool constant cannot be told from code: the three real sites are still there.
    assert {LINK_ADDRESS + 4, LINK_ADDRESS + 12, LINK_ADDRESS + 28} <= set(sites)
    with pytest.raises(GuestImageError, match="'_start' not found"):
        elf_trap_sites(stripped, ["_start"])


@needs_cc
def test_unknown_symbol_fails_loudly(guest_elf: Path) -> None:
    with pytest.raises(GuestImageError, match="'nope' not found"):
        elf_trap_sites(guest_elf, ["_start", "nope"])


def test_rejects_non_elf_and_wrong_machine(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf at all" * 8)
    with pytest.raises(GuestImageError, match="not an ELF"):
        elf_trap_sites(junk)
    x86 = tmp_path / "x86"
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0
    )
    x86.write_bytes(header)
    with pytest.raises(GuestImageError, match="EM_AARCH64"):
        elf_trap_sites(x86)
    with pytest.raises(GuestImageError, match="cannot read"):
        elf_trap_sites(tmp_path / "missing")


def test_segment_only_elf(tmp_path: Path) -> None:
    """A file with program headers but no section headers is scanned through its executable PT_LOADs."""
    code = struct.pack("<4I", 0xD503201F, HVC_0, SMC_0, 0xD65F03C0)  # nop; hvc; smc; ret
    data = struct.pack("<I", HVC_0)
    ehsize, phsize = 64, 56
    code_off, data_off = ehsize + 2 * phsize, ehsize + 2 * phsize + len(code)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,
        183,
        1,
        0x1000,
        ehsize,
        0,
        0,
        ehsize,
        phsize,
        2,
        0,
        0,
        0,
    )
    text = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x1000, 0x1000, len(code), len(code), 4)
    rodata = struct.pack("<IIQQQQQQ", 1, 4, data_off, 0x2000, 0x2000, len(data), len(data), 4)
    elf = tmp_path / "segments.elf"
    elf.write_bytes(header + text + rodata + code + data)
    assert elf_trap_sites(elf) == [0x1004, 0x1008]


# --------------------------------------------------------------------------------------------------
# Linux Image

TEXT = 0xFFFF800008000000


def _fake_image(words: dict[int, int], size: int = 0x40000) -> bytes:
    """An Image-shaped blob: the arm64 header magic at 0x38 and the given words at given offsets."""
    image = bytearray(size)
    image[0x38:0x3C] = b"ARM\x64"
    for offset, word in words.items():
        image[offset : offset + 4] = word.to_bytes(4, "little")
    return bytes(image)


BTI_C = 0xD503245F
FAKE_WORDS = {
    0x16000: BTI_C,  # __sdei_asm_handler
    0x16100: SMC_0,
    0x16108: HVC_0,
    0x16200: SMC_0,  # __sdei_handler_abort
    0x16208: HVC_0,
    0x16300: HVC_0,  # some_other_function: not a trap symbol
    0x28610: BTI_C,  # __arm_smccc_smc
    0x28614: SMC_0,
    0x28640: BTI_C,  # __arm_smccc_hvc
    0x28644: HVC_0,
    0x28670: HVC_0,  # arm_smccc_1_2_hvc, right after: must not be swallowed by __arm_smccc_hvc's extent
}
FAKE_SYMBOLS = {
    "_stext": TEXT + 0x10000,
    "__sdei_asm_handler": TEXT + 0x16000,
    "__sdei_handler_abort": TEXT + 0x16200,
    "some_other_function": TEXT + 0x16300,
    "__arm_smccc_smc": TEXT + 0x28610,
    "__arm_smccc_hvc": TEXT + 0x28640,
    "arm_smccc_1_2_hvc": TEXT + 0x28660,
    "acpi_sdei_init": TEXT + 0x30000,
}
FAKE_SITES = [TEXT + off for off in (0x16100, 0x16108, 0x16200, 0x16208, 0x28614, 0x28644)]


def test_linux_sites_from_mapping(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(_fake_image(FAKE_WORDS))
    assert linux_trap_sites(image, FAKE_SYMBOLS) == FAKE_SITES
    assert linux_trap_sites(image, FAKE_SYMBOLS, insns={HVC_0}) == [
        TEXT + 0x16108,
        TEXT + 0x16208,
        TEXT + 0x28644,
    ]
    assert linux_trap_sites(image, FAKE_SYMBOLS, ["__arm_smccc_hvc"]) == [TEXT + 0x28644]


def test_linux_sites_from_kallsyms_file_and_gzip(tmp_path: Path) -> None:
    image = tmp_path / "Image.gz"
    image.write_bytes(gzip.compress(_fake_image(FAKE_WORDS)))
    # A duplicate static name: the dict keeps one address, but its other address still bounds extents.
    lines = [f"{addr:016x} T {name}" for name, addr in FAKE_SYMBOLS.items()]
    lines.append(f"{TEXT + 0x16180:016x} t some_other_function")
    lines += ["garbage line", "zzzz T bad_address", f"{TEXT + 0x40000:016x} t in_module\t[sdei_test]"]
    kallsyms = tmp_path / "kallsyms.txt"
    kallsyms.write_text("\n".join(lines) + "\n")
    table = Kallsyms.parse(kallsyms.read_text())
    assert table["some_other_function"] == TEXT + 0x16300
    assert TEXT + 0x16180 in table.addresses
    # The extra address at 0x16180 cuts __sdei_asm_handler after both of its conduit instructions.
    assert linux_trap_sites(image, kallsyms) == FAKE_SITES
    assert linux_trap_sites(image, table) == FAKE_SITES


def test_duplicate_address_bounds_extent(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(_fake_image(FAKE_WORDS))
    table = Kallsyms([*FAKE_SYMBOLS.items(), ("some_other_function", TEXT + 0x16104)])
    assert table["some_other_function"] == TEXT + 0x16300  # the first one read wins the name
    assert linux_trap_sites(image, table, ["__sdei_asm_handler"]) == [TEXT + 0x16100]


def test_text_base_from_text_symbol_or_alignment() -> None:
    data = _fake_image(FAKE_WORDS)
    assert linux_text_base(data, FAKE_SYMBOLS) == TEXT
    assert linux_text_base(data, {**FAKE_SYMBOLS, "_text": TEXT}) == TEXT


def test_mismatched_kallsyms_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(_fake_image(FAKE_WORDS))
    shifted = {name: addr + 0x100 for name, addr in FAKE_SYMBOLS.items()}
    with pytest.raises(GuestImageError, match="does not match this Image"):
        linux_trap_sites(image, shifted)
    with pytest.raises(GuestImageError, match="lacks __sdei_asm_handler"):
        linux_trap_sites(image, {"__arm_smccc_hvc": TEXT + 0x28640})


def test_not_an_image(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(bytes(0x1000))
    with pytest.raises(GuestImageError, match="not an uncompressed arm64 Linux Image"):
        linux_trap_sites(image, FAKE_SYMBOLS)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b" + bytes(20))
    with pytest.raises(GuestImageError, match="gzip"):
        linux_trap_sites(broken, FAKE_SYMBOLS)


def test_dt_fix_detection() -> None:
    assert kernel_has_dt_sdei_fix(FAKE_SYMBOLS)
    assert not kernel_has_dt_sdei_fix({k: v for k, v in FAKE_SYMBOLS.items() if k != "acpi_sdei_init"})


def test_scan_words_alignment_and_bounds() -> None:
    blob = b"\x00" + HVC_0.to_bytes(4, "little") + b"\x00\x00\x00" + HVC_0.to_bytes(4, "little")
    assert list(scan_words(blob, 0x1000, 0, 1 << 64)) == [0x1008]
    assert list(scan_words(blob, 0x1000, 0x1009, 1 << 64)) == []
    assert list(scan_words(blob, 0x1000, 0x1000, 0x100B)) == []


def test_merge_sites() -> None:
    assert merge_sites([3, 1], (2, 3), iter([0x10])) == [1, 2, 3, 0x10]


# --------------------------------------------------------------------------------------------------
# load_kallsyms, with a stand-in for kallsyms-finder


def _fake_finder(tmp_path: Path, output: str, status: int = 0) -> tuple[list[str], Path]:
    """A script that counts its runs and prints ``output`` like kallsyms-finder would."""
    counter = tmp_path / "runs"
    script = tmp_path / "finder.py"
    script.write_text(
        "import sys, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "p.write_text(str(int(p.read_text()) + 1) if p.exists() else '1')\n"
        f"sys.stdout.write({output!r}); sys.stderr.write('[+] done\\n'); sys.exit({status})\n"
    )
    return [sys.executable, str(script)], counter


def test_load_kallsyms_runs_once_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command, runs = _fake_finder(tmp_path, "ffff800008010000 T _stext\nffff800008028640 T __arm_smccc_hvc\n")
    monkeypatch.setattr(traps, "_kallsyms_finder_command", lambda: command)
    image = tmp_path / "Image"
    image.write_bytes(_fake_image(FAKE_WORDS))
    cache = tmp_path / "cache"
    first = traps.load_kallsyms(image, cache)
    assert first == {"_stext": TEXT + 0x10000, "__arm_smccc_hvc": TEXT + 0x28640}
    assert traps.load_kallsyms(image, cache) == first
    assert runs.read_text() == "1"
    image.write_bytes(_fake_image({**FAKE_WORDS, 0x100: 1}))  # different bytes: a new entry
    traps.load_kallsyms(image, cache)
    assert runs.read_text() == "2"
    assert len(list(cache.glob("kallsyms-*.txt"))) == 2


def test_load_kallsyms_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command, _ = _fake_finder(tmp_path, "", status=1)
    monkeypatch.setattr(traps, "_kallsyms_finder_command", lambda: command)
    image = tmp_path / "Image"
    image.write_bytes(b"x")
    with pytest.raises(GuestImageError, match=r"no symbol table .*exit 1.*done"):
        traps.load_kallsyms(image, tmp_path / "cache")
    with pytest.raises(GuestImageError, match="cannot read"):
        traps.load_kallsyms(tmp_path / "missing", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # a failed run leaves nothing to be mistaken for a result
