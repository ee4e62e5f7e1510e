"""SDEI (Arm DEN 0054) function ids, return codes and encodings.

The values are the specification's; ``docs/sdei.md`` describes how the dispatcher uses each of them.
"""

from __future__ import annotations

from enum import IntEnum

FID_BASE_64 = 0xC400_0020  # SMC64 form; the only one SDEI defines
FID_BASE_32 = 0x8400_0020  # SMC32 form: not SDEI, answered NOT_SUPPORTED
FID_RANGE = 0x20  # function numbers 0x20..0x3F of the standard secure service owner


class Function(IntEnum):
    """SDEI calls by their SMC64 function id."""

    VERSION = 0xC400_0020
    EVENT_REGISTER = 0xC400_0021
    EVENT_ENABLE = 0xC400_0022
    EVENT_DISABLE = 0xC400_0023
    EVENT_CONTEXT = 0xC400_0024
    EVENT_COMPLETE = 0xC400_0025
    EVENT_COMPLETE_AND_RESUME = 0xC400_0026
    EVENT_UNREGISTER = 0xC400_0027
    EVENT_STATUS = 0xC400_0028
    EVENT_GET_INFO = 0xC400_0029
    EVENT_ROUTING_SET = 0xC400_002A
    PE_MASK = 0xC400_002B
    PE_UNMASK = 0xC400_002C
    INTERRUPT_BIND = 0xC400_002D
    INTERRUPT_RELEASE = 0xC400_002E
    EVENT_SIGNAL = 0xC400_002F
    FEATURES = 0xC400_0030
    PRIVATE_RESET = 0xC400_0031
    SHARED_RESET = 0xC400_0032


class Result(IntEnum):
    """SDEI return codes (signed; written to x0 as two's-complement u64)."""

    SUCCESS = 0
    NOT_SUPPORTED = -1
    INVALID_PARAMETERS = -2
    DENIED = -3
    PENDING = -5
    OUT_OF_RESOURCE = -10


class InfoId(IntEnum):
    """EVENT_GET_INFO info selectors (x2)."""

    EV_TYPE = 0
    EV_SIGNALED = 1
    EV_PRIORITY = 2
    EV_ROUTING_MODE = 3
    EV_ROUTING_AFF = 4


class Feature(IntEnum):
    """SDEI_FEATURES feature ids (x1)."""

    BIND_SLOTS = 0
    RELATIVE_MODE = 1  # SDEI 1.1


# EVENT_REGISTER flags (x4) and ROUTING_SET modes (x2)
RM_ANY = 0
RM_PE = 1
REGISTER_FLAGS_VALID = (RM_ANY, RM_PE)  # bit 1 (relative mode) is not supported, so refused

# EVENT_COMPLETE status (x1); informational only
EV_HANDLED = 0
EV_FAILED = 1

# EVENT_STATUS bits
STATUS_REGISTERED = 1 << 0
STATUS_ENABLED = 1 << 1
STATUS_RUNNING = 1 << 2

# EVENT_GET_INFO results
TYPE_PRIVATE = 0
TYPE_SHARED = 1
PRIORITY_NORMAL = 0
PRIORITY_CRITICAL = 1

SIGNAL_EVENT = 0  # the one architecturally defined event: software signalled, private, normal
SAVED_GPRS = 18  # x0..x17 are saved at dispatch and reachable through EVENT_CONTEXT

# MPIDR affinity fields Aff3 (39:32), Aff2 (23:16), Aff1 (15:8), Aff0 (7:0)
MPIDR_AFFINITY_MASK = 0xFF_00FF_FFFF

# Interrupt ids accepted by INTERRUPT_BIND (GIC): PPIs bind private slots, SPIs shared slots
PPI_RANGE = range(16, 32)
SPI_RANGE = range(32, 1020)


def encode_version(major: int, minor: int, vendor: int = 0) -> int:
    """SDEI_VERSION result: bits 62:48 major, 47:32 minor, 31:0 vendor (bit 63 clear)."""
    if not (0 <= major <= 0x7FFF and 0 <= minor <= 0xFFFF and 0 <= vendor <= 0xFFFF_FFFF):
        raise ValueError(f"SDEI version {major}.{minor} vendor {vendor:#x} does not fit the encoding")
    return (major << 48) | (minor << 32) | vendor


def decode_version(word: int) -> tuple[int, int, int]:
    """Inverse of :func:`encode_version`: (major, minor, vendor)."""
    return (word >> 48) & 0x7FFF, (word >> 32) & 0xFFFF, word & 0xFFFF_FFFF


def is_sdei_range(fid: int) -> bool:
    """True for any function id in the SDEI number range, SMC64 or SMC32 form."""
    return FID_BASE_64 <= fid < FID_BASE_64 + FID_RANGE or FID_BASE_32 <= fid < FID_BASE_32 + FID_RANGE
