"""Version negotiation and pinning policy, and the PSCI filter."""

from __future__ import annotations

import pytest

from qmp_sdei.abi import psci
from qmp_sdei.errors import VersionError
from qmp_sdei.versions import (
    PSCI_FUNCTIONS,
    VersionPins,
    VersionRequest,
    accept_incoming,
    negotiate,
    psci_answer,
)

QEMU_72 = (1, 1)  # what QEMU 7.2 under TCG answers PSCI_VERSION with


def test_first_boot_pins_latest_and_auto() -> None:
    result = negotiate(VersionRequest(), qemu_psci=QEMU_72, pinned=None)
    assert result.pins == VersionPins((1, 1), 0, (1, 1))
    assert result.newly_pinned
    assert result.warnings == ()


def test_first_boot_pins_what_config_asks() -> None:
    result = negotiate(VersionRequest("1.0", 0x4B564D, "0.2"), qemu_psci=QEMU_72, pinned=None)
    assert result.pins == VersionPins((1, 0), 0x4B564D, (0, 2))


def test_pins_survive_a_config_change_with_a_warning() -> None:
    pinned = VersionPins((1, 0), 0, (1, 0))
    result = negotiate(VersionRequest("1.1", 0, "1.1"), qemu_psci=QEMU_72, pinned=pinned)
    assert result.pins == pinned
    assert not result.newly_pinned
    assert len(result.warnings) == 2
    assert "keeping what it saw" in result.warnings[0]


def test_latest_does_not_raise_a_pinned_guest() -> None:
    pinned = VersionPins((1, 0), 0, (1, 0))
    assert negotiate(VersionRequest(), qemu_psci=QEMU_72, pinned=pinned).pins == pinned


def test_psci_above_what_qemu_implements_is_refused() -> None:
    with pytest.raises(VersionError, match=r"implements only up to 1\.0"):
        negotiate(VersionRequest(psci="1.1"), qemu_psci=(1, 0), pinned=None)
    with pytest.raises(VersionError, match="cannot honour"):
        negotiate(VersionRequest(), qemu_psci=(1, 0), pinned=VersionPins((1, 1), 0, (1, 1)))


@pytest.mark.parametrize("bad", [VersionRequest(sdei="2.0"), VersionRequest(psci="1.3"), VersionRequest(sdei="x")])
def test_unknown_requests_are_refused(bad: VersionRequest) -> None:
    with pytest.raises(VersionError):
        negotiate(bad, qemu_psci=QEMU_72, pinned=None)


def test_migration_destination_adopts_or_refuses() -> None:
    incoming = VersionPins((1, 0), 0, (1, 0))
    assert accept_incoming(None, incoming, qemu_psci=QEMU_72) == incoming
    assert accept_incoming(incoming, incoming, qemu_psci=QEMU_72) == incoming
    with pytest.raises(VersionError, match="cannot honour"):
        accept_incoming(None, VersionPins((1, 1), 0, (1, 1)), qemu_psci=(1, 0))
    with pytest.raises(VersionError, match="differ"):
        accept_incoming(VersionPins((1, 1), 0, (1, 1)), incoming, qemu_psci=QEMU_72)


def test_pins_round_trip_and_reject_junk() -> None:
    pins = VersionPins((1, 1), 0x4B564D, (0, 2))
    assert VersionPins.from_dict(pins.to_dict()) == pins
    for junk in [
        None,
        {},
        {"sdei": "1.1", "sdei_vendor": -1, "psci": "1.0"},
        {"sdei": "3.0", "sdei_vendor": 0, "psci": "1.0"},
    ]:
        with pytest.raises(VersionError):
            VersionPins.from_dict(junk)


def test_psci_function_sets_grow() -> None:
    assert PSCI_FUNCTIONS[(0, 2)] < PSCI_FUNCTIONS[(1, 0)] < PSCI_FUNCTIONS[(1, 1)]
    assert psci.Function.PSCI_FEATURES not in PSCI_FUNCTIONS[(0, 2)]
    assert psci.Function.SYSTEM_RESET2 in PSCI_FUNCTIONS[(1, 1)]


@pytest.mark.parametrize(
    ("pinned", "fid", "x1", "expected"),
    [
        ((1, 0), psci.Function.PSCI_VERSION, 0, 0x10000),
        ((0, 2), psci.Function.PSCI_VERSION, 0, 0x2),
        ((1, 1), psci.Function.PSCI_VERSION, 0, 0x10001),
        (
            (0, 2),
            psci.Function.PSCI_FEATURES,
            psci.Function.CPU_ON_64,
            psci.NOT_SUPPORTED,
        ),  # no FEATURES in 0.2
        ((1, 0), psci.Function.PSCI_FEATURES, psci.Function.SYSTEM_RESET2, psci.NOT_SUPPORTED),
        ((1, 0), psci.Function.SYSTEM_RESET2_64, 0, psci.NOT_SUPPORTED),
        ((1, 0), psci.Function.PSCI_FEATURES, psci.Function.CPU_ON_64, None),  # QEMU answers
        ((1, 1), psci.Function.PSCI_FEATURES, psci.Function.SYSTEM_RESET2, None),
        ((1, 0), psci.Function.CPU_ON_64, 1, None),
        ((1, 0), psci.Function.PSCI_FEATURES, 0x8000_0000, None),  # SMCCC_VERSION: not PSCI's range
        ((1, 0), 0xC400_0020, 0, None),  # SDEI: not PSCI
    ],
)
def test_psci_filter(pinned: tuple[int, int], fid: int, x1: int, expected: int | None) -> None:
    assert psci_answer(pinned, fid, x1) == expected
