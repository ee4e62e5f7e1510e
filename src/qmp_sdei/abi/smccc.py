"""SMC Calling Convention (Arm DEN 0028) function-id layout.

A function id lives in w0: bit 31 fast call, bit 30 SMC64, bits 29:24 service owner, bits 15:0
function number.
"""

from __future__ import annotations

U64_MASK = (1 << 64) - 1

FAST_CALL = 1 << 31
SMC64 = 1 << 30
OWNER_SHIFT = 24
OWNER_MASK = 0x3F
OWNER_STANDARD_SECURE = 4  # PSCI (0x00-0x1F) and SDEI (0x20-0x3F) live here

NOT_SUPPORTED = -1  # SMCCC_RET_NOT_SUPPORTED; also what an unknown function id answers


def function_id(x0: int) -> int:
    """The 32-bit function id in w0 (the upper half of x0 is not part of it)."""
    return x0 & 0xFFFF_FFFF


def owner(fid: int) -> int:
    return (fid >> OWNER_SHIFT) & OWNER_MASK


def is_smc64(fid: int) -> bool:
    return bool(fid & SMC64)


def to_u64(value: int) -> int:
    """Two's-complement encode a (possibly negative) result for a 64-bit register."""
    return value & U64_MASK


def to_s64(value: int) -> int:
    """Interpret a 64-bit register value as signed."""
    value &= U64_MASK
    return value - (1 << 64) if value & (1 << 63) else value
