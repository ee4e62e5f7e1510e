"""The symbol conduit's run-time kernel check: KASLR offsets from VBAR_EL1, and a late relocation
(the guest made its firmware calls before the sites were moved) is an error, not a silence."""

from __future__ import annotations

from typing import cast

import pytest

from qmp_sdei.abi import psci
from qmp_sdei.conduit.rsp import CoreRegs, RspClient, ThreadId
from qmp_sdei.conduit.symbols import KernelCheckedConduit
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.sdei import Dispatcher, EventSpec

VECTORS = 0xFFFF_8000_0801_0800
BHB_VECTORS = 0xFFFF_8000_0801_2800
SITE = 0xFFFF_8000_0802_8644


class _NoStub:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"talked to the stub ({name})")


def _conduit() -> KernelCheckedConduit:
    owner = SdeiOwner(Dispatcher(events=[EventSpec(0)], mpidrs=[0], version=(1, 1)))  # PSCI left to QEMU
    vectors = [VECTORS, *(BHB_VECTORS + slot * 0x800 for slot in range(4))]
    return KernelCheckedConduit(
        cast(RspClient, _NoStub()), owner, [SITE], vectors=vectors, kernel_sites=[SITE],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("vbar", "offset"),
    [
        (VECTORS, 0),
        (BHB_VECTORS + 0x800, 0),  # a Spectre-BHB table at its link address
        (VECTORS + 0x2E32_AEC0_0000, 0x2E32_AEC0_0000),  # direct boot: 2 MiB aligned
        (VECTORS + 0x4503_A359_0000, 0x4503_A359_0000),  # UEFI: 64 KiB aligned
        (BHB_VECTORS + 0x1000 + 0x4503_A359_0000, 0x4503_A359_0000),
        (VECTORS + 0x123, None),  # explained by no offset: another kernel
    ],
)
def test_offset_from_vbar(vbar: int, offset: int | None) -> None:
    assert _conduit()._offset_for(vbar) == offset


@pytest.mark.asyncio
async def test_first_call_after_a_move_must_be_the_psci_probe() -> None:
    conduit = _conduit()
    conduit.offset, conduit._first_call_pending = 0x2E32_AEC0_0000, True
    core = CoreRegs([psci.Function.SYSTEM_RESET] + [0] * 30, 0, SITE, 0x3C5)
    await conduit._trap(ThreadId(1, 1), core)
    assert conduit._failure is not None
    assert "first firmware calls untrapped" in str(conduit._failure)


@pytest.mark.asyncio
async def test_psci_version_first_is_in_time() -> None:
    conduit = _conduit()
    conduit.offset, conduit._first_call_pending = 0x2E32_AEC0_0000, True
    core = CoreRegs([psci.Function.PSCI_VERSION] + [0] * 30, 0, SITE, 0x3C5)
    await conduit._trap(ThreadId(1, 1), core)
    assert conduit._failure is None and not conduit._first_call_pending
