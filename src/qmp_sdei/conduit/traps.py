"""Find the guest's trap sites: the ``hvc #0`` / ``smc #0`` instructions the gdbstub conduit breakpoints.

Under TCG with ``psci-conduit=hvc``, QEMU 7.2 consumes *every* HVC in its PSCI emulation, so the only
way for an outside process to see an SDEI call is a breakpoint on the instruction itself, placed
before it executes. That needs the instruction's exact virtual address. This module finds them by
reading the guest image from disk, which is pure and testable without QEMU:

* :func:`elf_trap_sites` for ELF guests (bare-metal test programs): symbol table plus section bytes.
* :func:`linux_trap_sites` for a stock arm64 Linux ``Image`` booted with ``nokaslr``, whose symbol
  table is recovered from the embedded kallsyms by :func:`load_kallsyms` (Debian ships only a stub
  ``System.map``).

Everything returns plain sorted lists of addresses so a caller can merge them with addresses from a
config file (:func:`merge_sites`). We parse ELF with :mod:`struct` ourselves because we need only a
few fields and want no dependency for it.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from qmp_sdei.cache import cache_root
from qmp_sdei.errors import GuestImageError, HostError

HVC_0 = 0xD4000002
"""A64 encoding of ``hvc #0``: the SMCCC conduit for a guest under a hypervisor."""
SMC_0 = 0xD4000003
"""A64 encoding of ``smc #0``: the SMCCC conduit when the DT says ``method = "smc"``."""
CONDUIT_INSNS: frozenset[int] = frozenset({HVC_0, SMC_0})

LINUX_TRAP_SYMBOLS: tuple[str, ...] = (
    # Every SDEI call the driver makes, and every PSCI call, goes through these two (via
    # arm_smccc_hvc()/arm_smccc_smc()); each has one conduit instruction after its ``bti c``.
    "__arm_smccc_hvc",
    "__arm_smccc_smc",
    # The SDEI exit (EVENT_COMPLETE / COMPLETE_AND_RESUME) is issued inline from the asm entry
    # point, not through __arm_smccc_*; it has both an smc and an hvc, chosen by the exit conduit.
    "__sdei_asm_handler",
    # 6.6+ crash path: COMPLETE_AND_RESUME out of an active handler.
    "__sdei_handler_abort",
    # With KPTI the exit runs from the trampoline alias; only present in some builds. Its address
    # here is the link address, not the alias VA (pitfall 9): boot with nokaslr and a kpti-safe CPU.
    "__sdei_asm_exit_trampoline",
)
"""Kernel symbols that contain SDEI or PSCI conduit instructions in mainline arm64 Linux."""

LINUX_REQUIRED_SYMBOLS: tuple[str, ...] = ("__arm_smccc_hvc", "__sdei_asm_handler")
"""Without these the kernel cannot talk SDEI to firmware, so a table lacking them is the wrong one."""

LINUX_DT_SDEI_FIX_SYMBOL = "acpi_sdei_init"
"""Present once 59529bbe642d made DT-booted kernels register the SDEI driver again (pitfall 10)."""

_MAX_SYMBOL_EXTENT = 64 * 1024
"""Upper bound on an unsized symbol's scanned length, so a last symbol cannot drag in the whole image."""

_ARM64_IMAGE_MAGIC_OFFSET = 0x38
_ARM64_IMAGE_MAGIC = b"ARM\x64"
_KIMAGE_ALIGN = 2 * 1024 * 1024
"""With nokaslr, ``_text`` is the 2 MiB-aligned KIMAGE_VADDR, and the first kallsyms entry lies within
the first 2 MiB (it is ``_stext`` at ``_text + 64 KiB`` on 6.1)."""


# --------------------------------------------------------------------------------------------------
# Scanning


def scan_words(
    data: bytes | memoryview, base: int, start: int, end: int, insns: Collection[int] = CONDUIT_INSNS
) -> Iterator[int]:
    """Yield the addresses of aligned little-endian words in ``[start, end)`` equal to one of ``insns``.

    ``data[0]`` is at virtual address ``base``. A64 instructions are always 4-byte aligned, so an
    unaligned match would be data, not code, and is skipped.
    """
    start = max(start, base)
    end = min(end, base + len(data))
    start = (start + 3) & ~3
    view = memoryview(data)
    for va in range(start, end - 3, 4):
        off = va - base
        if int.from_bytes(view[off : off + 4], "little") in insns:
            yield va


def merge_sites(*groups: Iterable[int]) -> list[int]:
    """Combine trap-site lists (discovered, configured) into one sorted list without duplicates."""
    return sorted({int(address) for group in groups for address in group})


# --------------------------------------------------------------------------------------------------
# ELF64


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")

_EM_AARCH64 = 183
_SHT_PROGBITS = 1
_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_PT_LOAD = 1
_PF_X = 0x1
_STT_FUNC = 2
_STT_SECTION = 3
_STT_FILE = 4
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00


@dataclass(frozen=True)
class ElfSymbol:
    """One entry of an ELF symbol table (only the fields trap discovery needs)."""

    name: str
    value: int
    size: int
    kind: int  # STT_*
    section: int  # st_shndx


@dataclass(frozen=True)
class _Region:
    """A run of file bytes that is loaded at ``vaddr``: a section, or a segment when there are none."""

    vaddr: int
    offset: int
    size: int
    executable: bool
    index: int  # section index, or -1 for a segment

    def contains(self, va: int) -> bool:
        return self.vaddr <= va < self.vaddr + self.size


class ElfImage:
    """A minimal little-endian ELF64 reader: headers, allocated sections or load segments, symbols."""

    def __init__(self, data: bytes, name: str = "<memory>") -> None:
        self.data = data
        self.name = name
        if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
            raise GuestImageError(f"{name}: not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise GuestImageError(f"{name}: only little-endian ELF64 is supported (EI_CLASS/EI_DATA)")
        (_, _, machine, _, self.entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx) = (
            _EHDR.unpack_from(data)
        )
        if machine != _EM_AARCH64:
            raise GuestImageError(f"{name}: e_machine is {machine}, not EM_AARCH64 ({_EM_AARCH64})")
        self.sections = self._read_sections(shoff, shentsize, shnum)
        self._shstrndx = shstrndx
        self.segments = self._read_segments(phoff, phentsize, phnum)
        self.symbols = self._read_symbols()

    def _table(self, offset: int, entsize: int, count: int, record: struct.Struct) -> list[tuple[int, ...]]:
        if offset == 0 or count == 0:
            return []
        if entsize < record.size or offset + entsize * count > len(self.data):
            raise GuestImageError(f"{self.name}: header table at {offset:#x} runs past the end of the file")
        return [record.unpack_from(self.data, offset + i * entsize) for i in range(count)]

    def _read_sections(self, shoff: int, shentsize: int, shnum: int) -> list[tuple[int, ...]]:
        if shoff and shnum == 0:  # extended numbering: the real count is in section 0's sh_size
            shnum = self._table(shoff, shentsize, 1, _SHDR)[0][5]
        return self._table(shoff, shentsize, shnum, _SHDR)

    def _read_segments(self, phoff: int, phentsize: int, phnum: int) -> list[tuple[int, ...]]:
        return self._table(phoff, phentsize, phnum, _PHDR)

    def _string(self, table_offset: int, index: int) -> str:
        start = table_offset + index
        end = self.data.find(b"\0", start)
        if end < 0:
            raise GuestImageError(f"{self.name}: unterminated string in a string table")
        return self.data[start:end].decode("utf-8", "replace")

    def section_name(self, index: int) -> str:
        if not self.sections or self._shstrndx >= len(self.sections):
            return ""
        return self._string(self.sections[self._shstrndx][4], self.sections[index][0])

    def _read_symbols(self) -> list[ElfSymbol]:
        tables = [s for s in self.sections if s[1] == _SHT_SYMTAB] or [s for s in self.sections if s[1] == _SHT_DYNSYM]
        symbols: list[ElfSymbol] = []
        for _, _, _, _, offset, size, link, _, _, entsize in tables:
            if link >= len(self.sections):
                raise GuestImageError(f"{self.name}: symbol table links to missing section {link}")
            strtab = self.sections[link][4]
            for st_name, info, _, shndx, value, st_size in self._table(offset, entsize, size // entsize, _SYM):
                kind = info & 0xF
                if st_name == 0 or kind in (_STT_SECTION, _STT_FILE):
                    continue
                name = self._string(strtab, st_name)
                symbols.append(ElfSymbol(name, value, st_size, kind, shndx))
        return symbols

    def regions(self) -> list[_Region]:
        """Loaded bytes: allocated PROGBITS sections, or PT_LOAD segments for a section-less file."""
        regions = [
            _Region(addr, offset, size, bool(flags & _SHF_EXECINSTR), index)
            for index, (_, kind, flags, addr, offset, size, *_) in enumerate(self.sections)
            if kind == _SHT_PROGBITS and flags & _SHF_ALLOC and size
        ]
        if regions:
            return regions
        return [
            _Region(vaddr, offset, filesz, bool(flags & _PF_X), -1)
            for kind, flags, offset, vaddr, _, filesz, _, _ in self.segments
            if kind == _PT_LOAD and filesz
        ]

    def region_bytes(self, region: _Region) -> memoryview:
        if region.offset + region.size > len(self.data):
            raise GuestImageError(f"{self.name}: section at {region.vaddr:#x} runs past the end of the file")
        return memoryview(self.data)[region.offset : region.offset + region.size]


def _symbol_extent(symbol: ElfSymbol, image: ElfImage, region: _Region) -> tuple[int, int]:
    """Where a symbol's code ends: its ``st_size``, else the next symbol in its section (asm labels)."""
    end_of_region = region.vaddr + region.size
    if symbol.size:
        return symbol.value, min(symbol.value + symbol.size, end_of_region)
    later = [
        s.value
        for s in image.symbols
        if s.value > symbol.value and region.contains(s.value) and not s.name.startswith("$x")
    ]
    end = min([*later, end_of_region, symbol.value + _MAX_SYMBOL_EXTENT])
    return symbol.value, end


def _data_ranges(image: ElfImage, region: _Region) -> list[tuple[int, int]]:
    """Literal pools marked by AArch64 mapping symbols (``$d`` up to the next ``$x``) inside a region."""
    marks = sorted(
        (s.value, s.name[:2]) for s in image.symbols if s.name[:2] in ("$d", "$x") and region.contains(s.value)
    )
    ranges: list[tuple[int, int]] = []
    for i, (address, kind) in enumerate(marks):
        if kind == "$d":
            end = marks[i + 1][0] if i + 1 < len(marks) else region.vaddr + region.size
            ranges.append((address, end))
    return ranges


def elf_trap_sites(
    path: Path | str, symbols: Iterable[str] | None = None, *, insns: Collection[int] = CONDUIT_INSNS
) -> list[int]:
    """Return the sorted virtual addresses of ``hvc #0``/``smc #0`` in an aarch64 ELF64 file.

    With ``symbols``, only those symbols' code is scanned (``st_size`` bytes, or up to the next
    symbol for unsized assembly labels); every named symbol must exist, so a typo fails loudly
    instead of silently leaving a call untrapped. With ``None``, every executable section is scanned:
    a superset of all functions that also catches hypercalls in hand-written assembly without
    ``.type``/``.size``. Either way, literal pools marked by ``$d`` mapping symbols are skipped, since
    a constant equal to the encoding is not an instruction (a stripped file has no such marks).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GuestImageError(f"cannot read guest image {path}: {err}") from err
    image = ElfImage(data, str(path))
    regions = image.regions()

    def code_in(region: _Region, start: int, end: int) -> Iterator[int]:
        pools = _data_ranges(image, region)
        for va in scan_words(image.region_bytes(region), region.vaddr, start, end, insns):
            if not any(lo <= va < hi for lo, hi in pools):
                yield va

    sites: set[int] = set()
    if symbols is None:
        for region in regions:
            if region.executable:
                sites.update(code_in(region, region.vaddr, region.vaddr + region.size))
        return sorted(sites)

    by_name: dict[str, ElfSymbol] = {}
    for symbol in image.symbols:
        if symbol.section != _SHN_UNDEF and symbol.section < _SHN_LORESERVE:
            by_name.setdefault(symbol.name, symbol)
    for name in symbols:
        found = by_name.get(name)
        if found is None:
            raise GuestImageError(f"{path}: symbol {name!r} not found (or undefined) in the symbol table")
        home = next((r for r in regions if r.contains(found.value)), None)
        if home is None:
            raise GuestImageError(f"{path}: symbol {name!r} at {found.value:#x} is not in any loaded section")
        sites.update(code_in(home, *_symbol_extent(found, image, home)))
    return sorted(sites)


# --------------------------------------------------------------------------------------------------
# Linux arm64 Image + kallsyms


class Kallsyms(dict[str, int]):
    """A kernel symbol table: name to address, plus every symbol address for computing extents.

    Kernels have many duplicate static names (``gic_handle_irq`` twice, for one), and a plain dict
    keeps one address per name. Symbol extents are "up to the next symbol", so a lost address could
    let a scan run into the following function; ``addresses`` keeps them all.
    """

    def __init__(self, entries: Iterable[tuple[str, int]] = ()) -> None:
        super().__init__()
        addresses: set[int] = set()
        for name, address in entries:
            self.setdefault(name, address)
            addresses.add(address)
        self.addresses: tuple[int, ...] = tuple(sorted(addresses))

    @classmethod
    def parse(cls, text: str) -> Kallsyms:
        """Parse ``/proc/kallsyms`` / ``kallsyms-finder`` output (``ADDR TYPE NAME [module]`` lines)."""
        entries: list[tuple[str, int]] = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 3 or len(fields[1]) != 1:
                continue
            try:
                address = int(fields[0], 16)
            except ValueError:
                continue
            entries.append((fields[2], address))
        return cls(entries)


def _image_bytes(image: Path) -> bytes:
    """Read an arm64 ``Image``, undoing gzip (``Image.gz``) if that is how it was shipped."""
    try:
        data = image.read_bytes()
    except OSError as err:
        raise GuestImageError(f"cannot read kernel image {image}: {err}") from err
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise GuestImageError(f"{image}: gzip-compressed but cannot be decompressed: {err}") from err
    magic = data[_ARM64_IMAGE_MAGIC_OFFSET : _ARM64_IMAGE_MAGIC_OFFSET + 4]
    if magic != _ARM64_IMAGE_MAGIC:
        raise GuestImageError(
            f"{image}: not an uncompressed arm64 Linux Image (no 'ARM\\x64' magic at 0x38); "
            "EFI zboot and other compressed formats are not supported"
        )
    return data


def _kallsyms_of(source: Mapping[str, int] | Path) -> tuple[Mapping[str, int], tuple[int, ...]]:
    if isinstance(source, Path):
        try:
            source = Kallsyms.parse(source.read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise GuestImageError(f"cannot read kallsyms file {source}: {err}") from err
    if isinstance(source, Kallsyms):
        return source, source.addresses
    return source, tuple(sorted(set(source.values())))


def linux_text_base(image_data: bytes, kallsyms: Mapping[str, int]) -> int:
    """Return the link (= nokaslr runtime) address of ``_text``, i.e. of Image file offset 0.

    ``/proc/kallsyms`` lists ``_text``, but tables recovered by kallsyms-finder start at ``_stext``.
    Then the base is the lowest symbol rounded down to the 2 MiB KIMAGE_VADDR alignment. Either way
    the answer is checked against the image: ``__arm_smccc_hvc`` must hold an ``hvc #0`` in its first
    few instructions, so a wrong base or a table from another build fails here instead of putting
    breakpoints on random instructions.
    """
    if "_text" in kallsyms:
        base = kallsyms["_text"]
    else:
        named = [kallsyms[name] for name in ("_stext", "_head") if name in kallsyms]
        anchors = named or list(kallsyms.values())
        if not anchors:
            raise GuestImageError("the kallsyms table is empty")
        base = min(anchors) & ~(_KIMAGE_ALIGN - 1)
    for name, insn in (("__arm_smccc_hvc", HVC_0), ("__arm_smccc_smc", SMC_0)):
        if name not in kallsyms:
            continue
        start = kallsyms[name]
        if not any(scan_words(image_data, base, start, start + 32, (insn,))):
            raise GuestImageError(
                f"kallsyms does not match this Image: no conduit instruction at {name} "
                f"({start:#x}, assuming _text={base:#x}); was it recovered from a different kernel?"
            )
    return base


def linux_trap_sites(
    image: Path | str,
    kallsyms: Mapping[str, int] | Path,
    symbols: Iterable[str] = LINUX_TRAP_SYMBOLS,
    *,
    insns: Collection[int] = CONDUIT_INSNS,
) -> list[int]:
    """Return the sorted runtime addresses of the conduit instructions Linux uses for SDEI and PSCI.

    Valid for a kernel booted with ``nokaslr``, where runtime VA = ``_text`` + Image file offset.
    Each symbol extends to the next higher symbol address. Symbols absent from the table are skipped
    (``__sdei_handler_abort`` is 6.6+, the trampoline depends on the config), but the ones in
    :data:`LINUX_REQUIRED_SYMBOLS` must be there. ``kallsyms`` is a mapping (ideally a
    :class:`Kallsyms`, which keeps duplicate names' addresses) or a path to a kallsyms text file.

    The result includes both the ``hvc`` and the ``smc`` forms; breakpoints on the conduit the guest
    does not use are never hit, so this stays correct whichever ``method`` the DT names. Pass
    ``insns={HVC_0}`` to get only one.
    """
    image = Path(image)
    table, addresses = _kallsyms_of(kallsyms)
    missing = [name for name in LINUX_REQUIRED_SYMBOLS if name not in table]
    if missing:
        raise GuestImageError(
            f"kallsyms lacks {', '.join(missing)}: not an arm64 kernel with SDEI support "
            "(CONFIG_ARM_SDE_INTERFACE), or not a kernel symbol table at all"
        )
    data = _image_bytes(image)
    base = linux_text_base(data, table)
    sites: set[int] = set()
    for name in symbols:
        start = table.get(name)
        if start is None:
            continue
        later = bisect.bisect_right(addresses, start)
        end = addresses[later] if later < len(addresses) else start + _MAX_SYMBOL_EXTENT
        end = min(end, start + _MAX_SYMBOL_EXTENT)
        sites.update(scan_words(data, base, start, end, insns))
    return sorted(sites)


def kernel_has_dt_sdei_fix(kallsyms: Mapping[str, int]) -> bool:
    """Whether a DT-booted kernel will probe SDEI at all.

    Between v5.19 and commit 59529bbe642d, ``sdei_init()`` ran only from ``acpi_ghes_init()``, so a
    DT boot printed nothing about SDEI and a boot test waiting for the banner would just time out.
    The fix introduced ``acpi_sdei_init``; kernels before v5.19 have neither symbol but call
    ``sdei_init`` as an initcall, which we cannot tell apart from the broken ones by name alone, so
    this answers only for the presence of the fix.
    """
    return LINUX_DT_SDEI_FIX_SYMBOL in kallsyms


def _kallsyms_finder_command() -> list[str]:
    """How to run vmlinux-to-elf's ``kallsyms-finder`` with the interpreter we run under."""
    if importlib.util.find_spec("vmlinux_to_elf") is not None:
        return [sys.executable, "-m", "vmlinux_to_elf.scripts.kallsyms_finder"]
    beside = Path(sys.executable).with_name("kallsyms-finder")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("kallsyms-finder")
    if found is not None:
        return [found]
    raise HostError(
        "kallsyms-finder not found: install the 'linux' extra (pip install 'qmp-sdei[linux]', "
        "which brings vmlinux-to-elf) to recover symbols from a stock kernel Image"
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_kallsyms(image: Path | str, cache_dir: Path | str | None = None, *, timeout: float = 300.0) -> Kallsyms:
    """Recover a kernel Image's symbol table with ``kallsyms-finder``, cached by the image's SHA-256.

    Debian's ``System.map`` is a stub and the real one is in an 800 MB ``-dbg`` package, so we read
    the kallsyms table the kernel embeds for ``/proc/kallsyms``. That takes a few seconds, so the
    text output is kept in ``cache_dir`` (default: ``kallsyms/`` under the qmp-sdei cache root) and
    reused for the same image bytes.
    """
    image = Path(image)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "kallsyms"
    try:
        key = _file_sha256(image)
    except OSError as err:
        raise GuestImageError(f"cannot read kernel image {image}: {err}") from err
    cached = cache_dir / f"kallsyms-{key[:32]}.txt"
    if cached.exists():
        table = Kallsyms.parse(cached.read_text(encoding="utf-8", errors="replace"))
        if table:
            return table
    command = [*_kallsyms_finder_command(), str(image)]
    try:
        result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise HostError(f"kallsyms-finder on {image} did not finish within {timeout}s") from err
    except OSError as err:
        raise HostError(f"cannot run {command[0]}: {err}") from err
    text = result.stdout.decode("utf-8", "replace")
    table = Kallsyms.parse(text)
    if result.returncode != 0 or not table:
        tail = " | ".join(result.stderr.decode("utf-8", "replace").strip().splitlines()[-5:])
        raise GuestImageError(f"kallsyms-finder found no symbol table in {image} (exit {result.returncode}): {tail}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=cached.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(tmp, cached)  # atomic: a concurrent test run sees the whole file or none
    return table
