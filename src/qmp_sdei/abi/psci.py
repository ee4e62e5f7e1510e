"""PSCI (Arm DEN 0022) function ids, version encoding and which version defines which function."""

from __future__ import annotations

from enum import IntEnum

NOT_SUPPORTED = -1
INVALID_PARAMETERS = -2


class Function(IntEnum):
    """PSCI function ids. ``_64`` variants are the SMC64 forms of calls that take addresses."""

    PSCI_VERSION = 0x8400_0000
    CPU_SUSPEND = 0x8400_0001
    CPU_SUSPEND_64 = 0xC400_0001
    CPU_OFF = 0x8400_0002
    CPU_ON = 0x8400_0003
    CPU_ON_64 = 0xC400_0003
    AFFINITY_INFO = 0x8400_0004
    AFFINITY_INFO_64 = 0xC400_0004
    MIGRATE = 0x8400_0005
    MIGRATE_64 = 0xC400_0005
    MIGRATE_INFO_TYPE = 0x8400_0006
    MIGRATE_INFO_UP_CPU = 0x8400_0007
    MIGRATE_INFO_UP_CPU_64 = 0xC400_0007
    SYSTEM_OFF = 0x8400_0008
    SYSTEM_RESET = 0x8400_0009
    PSCI_FEATURES = 0x8400_000A
    CPU_FREEZE = 0x8400_000B
    CPU_DEFAULT_SUSPEND = 0x8400_000C
    CPU_DEFAULT_SUSPEND_64 = 0xC400_000C
    NODE_HW_STATE = 0x8400_000D
    NODE_HW_STATE_64 = 0xC400_000D
    SYSTEM_SUSPEND = 0x8400_000E
    SYSTEM_SUSPEND_64 = 0xC400_000E
    PSCI_SET_SUSPEND_MODE = 0x8400_000F
    PSCI_STAT_RESIDENCY = 0x8400_0010
    PSCI_STAT_RESIDENCY_64 = 0xC400_0010
    PSCI_STAT_COUNT = 0x8400_0011
    PSCI_STAT_COUNT_64 = 0xC400_0011
    SYSTEM_RESET2 = 0x8400_0012
    SYSTEM_RESET2_64 = 0xC400_0012
    MEM_PROTECT = 0x8400_0013
    MEM_PROTECT_CHECK_RANGE = 0x8400_0014
    MEM_PROTECT_CHECK_RANGE_64 = 0xC400_0014


_F = Function

#: Functions each PSCI version defines. Later versions are supersets of earlier ones.
FUNCTIONS_BY_VERSION: dict[tuple[int, int], frozenset[int]] = {}
FUNCTIONS_BY_VERSION[(0, 2)] = frozenset(
    {
        _F.PSCI_VERSION, _F.CPU_SUSPEND, _F.CPU_SUSPEND_64, _F.CPU_OFF, _F.CPU_ON, _F.CPU_ON_64,
        _F.AFFINITY_INFO, _F.AFFINITY_INFO_64, _F.MIGRATE, _F.MIGRATE_64, _F.MIGRATE_INFO_TYPE,
        _F.MIGRATE_INFO_UP_CPU, _F.MIGRATE_INFO_UP_CPU_64, _F.SYSTEM_OFF, _F.SYSTEM_RESET,
    }
)  # fmt: skip
FUNCTIONS_BY_VERSION[(1, 0)] = FUNCTIONS_BY_VERSION[(0, 2)] | {
    _F.PSCI_FEATURES, _F.CPU_FREEZE, _F.CPU_DEFAULT_SUSPEND, _F.CPU_DEFAULT_SUSPEND_64,
    _F.NODE_HW_STATE, _F.NODE_HW_STATE_64, _F.SYSTEM_SUSPEND, _F.SYSTEM_SUSPEND_64,
    _F.PSCI_SET_SUSPEND_MODE, _F.PSCI_STAT_RESIDENCY, _F.PSCI_STAT_RESIDENCY_64,
    _F.PSCI_STAT_COUNT, _F.PSCI_STAT_COUNT_64,
}  # fmt: skip
FUNCTIONS_BY_VERSION[(1, 1)] = FUNCTIONS_BY_VERSION[(1, 0)] | {
    _F.SYSTEM_RESET2, _F.SYSTEM_RESET2_64, _F.MEM_PROTECT,
    _F.MEM_PROTECT_CHECK_RANGE, _F.MEM_PROTECT_CHECK_RANGE_64,
}  # fmt: skip


def encode_version(major: int, minor: int) -> int:
    """PSCI_VERSION result: major in bits 30:16, minor in 15:0 (0.2 = 0x2, 1.1 = 0x10001)."""
    return (major << 16) | minor


def decode_version(word: int) -> tuple[int, int]:
    return (word >> 16) & 0x7FFF, word & 0xFFFF


def is_psci_range(fid: int) -> bool:
    """PSCI owns function numbers 0x00..0x1F of the standard secure service, both conventions."""
    return (fid & 0xBFFF_FFE0) == 0x8400_0000
