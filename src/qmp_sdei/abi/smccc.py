"""SMC Calling Convention (Arm DEN 0028) function-id layout.

A function id lives in w0: bit 31 fast call, bit 30 SMC64, bits 29:24 service owner, bit 16 the
SMCCC v1.3 "SVE state not live" hint (fast calls only), bits 15:0 function number.

The hint tells firmware it need not preserve the caller's SVE state; it does not change which
function is called. A guest whose CPU has SVE (Linux on ``-cpu max``) sets it on every call, so
:func:`function_id` clears it and every decoder in the project sees the plain id.
"""

from __future__ import annotations

U64_MASK = (1 << 64) - 1

FAST_CALL = 1 << 31
SMC64 = 1 << 30
OWNER_SHIFT = 24
OWNER_MASK = 0x3F
OWNER_STANDARD_SECURE = 4  # PSCI (0x00-0x1F) and SDEI (0x20-0x3F) live here

#: SMCCC v1.3: "no live SVE state" hint in a fast call's function id; 0 on older callers.
SVE_HINT = 1 << 16

NOT_SUPPORTED = -1  # SMCCC_RET_NOT_SUPPORTED; also what an unknown function id answers


def function_id(x0: int) -> int:
    """The 32-bit function id in w0, without the SVE hint (the upper half of x0 is not part of it)."""
    fid = x0 & 0xFFFF_FFFF
    if fid & FAST_CALL:
        fid &= ~SVE_HINT
    return fid


def has_sve_hint(x0: int) -> bool:
    """True if the call in x0 is a fast call carrying the SMCCC v1.3 SVE-not-live hint."""
    return bool(x0 & FAST_CALL) and bool(x0 & SVE_HINT)


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
