"""The SDEI dispatcher core: pure, synchronous, deterministic (no I/O, no asyncio, no QEMU).

Public, stable API (conformance tests drive it)::

    from qmp_sdei.sdei import Dispatcher, EventSpec, VcpuRegs
"""

from qmp_sdei.sdei.dispatcher import (
    DYNAMIC_PRIVATE_BASE,
    DYNAMIC_SHARED_BASE,
    Completion,
    Dispatcher,
    TriggerOutcome,
    TriggerResult,
    handler_entry_pstate,
)
from qmp_sdei.sdei.model import PROFILES, EventSpec, Profile, VcpuRegs
from qmp_sdei.sdei.snapshot import SnapshotInfo, peek
from qmp_sdei.sdei.state import HandlerState

__all__ = [
    "DYNAMIC_PRIVATE_BASE",
    "DYNAMIC_SHARED_BASE",
    "PROFILES",
    "Completion",
    "Dispatcher",
    "EventSpec",
    "HandlerState",
    "Profile",
    "SnapshotInfo",
    "TriggerOutcome",
    "TriggerResult",
    "VcpuRegs",
    "handler_entry_pstate",
    "peek",
]
