"""SMCCC function-id decoding, including the SMCCC v1.3 SVE-not-live hint (bit 16)."""

from __future__ import annotations

from typing import cast

import pytest

from qmp_sdei.abi import psci
from qmp_sdei.abi.sdei import Function as SdeiFunction
from qmp_sdei.abi.sdei import decode_version
from qmp_sdei.abi.smccc import SVE_HINT, function_id, has_sve_hint
from qmp_sdei.conduit.gdbstub import GdbstubConduit
from qmp_sdei.conduit.rsp import CoreRegs, RspClient, ThreadId
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.versions import VersionPins, psci_answer


def test_hinted_sdei_version_decodes_to_sdei_version() -> None:
    assert function_id(0xC401_0020) == SdeiFunction.VERSION
    assert has_sve_hint(0xC401_0020)


@pytest.mark.parametrize("fid", [0x8400_0000, 0xC400_0003, 0x8400_000A, 0xC400_0031])
def test_hint_is_cleared_for_every_fast_call(fid: int) -> None:
    assert function_id(fid | SVE_HINT) == fid
    assert function_id(fid) == fid
    assert not has_sve_hint(fid)


def test_yielding_calls_keep_bit_16() -> None:
    # Bit 16 is only the hint in fast calls; a yielding call's id is taken as it is.
    assert function_id(0x0401_0020) == 0x0401_0020
    assert not has_sve_hint(0x0401_0020)


def test_upper_half_of_x0_is_ignored_with_the_hint() -> None:
    assert function_id((0xDEAD << 32) | 0xC401_0020) == SdeiFunction.VERSION


def test_psci_filter_sees_through_the_hint() -> None:
    assert psci_answer((1, 0), function_id(0x8401_0000), 0) == psci.encode_version(1, 0)
    # PSCI_FEATURES asked about a hinted id of a function PSCI 1.0 lacks (SYSTEM_RESET2)
    assert psci_answer((1, 0), psci.Function.PSCI_FEATURES, psci.Function.SYSTEM_RESET2 | SVE_HINT) == -1


class _NoStub:
    """The pass-through decision needs no stub traffic; any use of it is a test failure."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the trap decision talked to the stub ({name})")


def _conduit(pins: VersionPins | None = None) -> GdbstubConduit:
    """A conduit whose owner filters PSCI for ``pins`` (None: every PSCI call goes to QEMU)."""
    owner = SdeiOwner(Dispatcher(events=[EventSpec(0)], mpidrs=[0], version=(1, 1)), pins=pins)
    return GdbstubConduit(cast(RspClient, _NoStub()), owner, [0x1000])


def _core(x0: int) -> CoreRegs:
    return CoreRegs([x0] + [0] * 30, 0, 0x1000, 0x3C5)


VCPU0 = ThreadId(1, 1)


@pytest.mark.asyncio
async def test_conduit_passes_psci_on_without_the_hint() -> None:
    conduit = _conduit()
    core = _core(0xC401_0003)  # CPU_ON with the hint
    assert await conduit._trap(VCPU0, core) == VCPU0  # passed through to QEMU
    assert core.x[0] == 0xC400_0003
    assert conduit._dirty == {0: core}  # written back before the step


@pytest.mark.asyncio
async def test_conduit_answers_hinted_sdei_version() -> None:
    conduit = _conduit()
    core = _core(0xC401_0020)
    assert await conduit._trap(VCPU0, core) is None
    assert decode_version(core.x[0])[:2] == (1, 1)
    assert core.pc == 0x1004


@pytest.mark.asyncio
async def test_conduit_answers_hinted_psci_version_through_the_filter() -> None:
    conduit = _conduit(VersionPins((1, 1), 0, (1, 0)))
    core = _core(0x8401_0000)
    assert await conduit._trap(VCPU0, core) is None
    assert core.x[0] == psci.encode_version(1, 0)


@pytest.mark.asyncio
async def test_unhinted_pass_through_writes_nothing() -> None:
    conduit = _conduit()
    assert await conduit._trap(VCPU0, _core(0x8400_0000)) == VCPU0
    assert conduit._dirty == {}
