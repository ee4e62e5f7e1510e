"""The blob that carries SDEI state inside QEMU's migration stream, and the destination's checks."""

from __future__ import annotations

import pytest

from qmp_sdei.errors import IncompatibleState, VersionError
from qmp_sdei.migration import decode_envelope, encode_envelope
from qmp_sdei.statefile import VmIdentity
from qmp_sdei.versions import VersionPins, accept_incoming
from support.sdei import PRIVATE, make, register

PINS = VersionPins((1, 0), 0, (1, 0))
IDENTITY = VmIdentity("0b0e1e7c-2b1d-4c61-9a4c-7c3f2d1e0a9b", "vm1")


def source_state() -> bytes:
    d = make(version=(1, 0))
    register(d, 1, PRIVATE)
    return d.snapshot()


def blob() -> bytes:
    return encode_envelope(PINS, IDENTITY, source_state(), source_running=True)


def test_round_trip_keeps_pins_identity_and_the_state() -> None:
    incoming = decode_envelope(blob())
    assert incoming.pins == PINS and incoming.identity == IDENTITY and incoming.source_running
    target = make(version=(1, 0))
    target.restore(incoming.snapshot)
    assert target.instance(PRIVATE, 1).state.enabled and not target.vcpus[1].masked


@pytest.mark.parametrize("cut", [0, 3, 9, 10, 40])
def test_truncated_blobs_are_refused(cut: int) -> None:
    data = blob()

    def install() -> None:
        make(version=(1, 0)).restore(decode_envelope(data[:cut]).snapshot)

    with pytest.raises(IncompatibleState):
        install()


def test_foreign_and_future_blobs_are_refused() -> None:
    data = blob()
    with pytest.raises(IncompatibleState, match="not a qmp-sdei"):
        decode_envelope(b"XXXX" + data[4:])
    with pytest.raises(IncompatibleState, match="envelope version 2"):
        decode_envelope(data[:4] + b"\x00\x02" + data[6:])
    with pytest.raises(IncompatibleState, match="damaged header"):
        decode_envelope(data[:10] + b"[" + data[11:])


def test_every_flipped_byte_is_caught_before_anything_changes() -> None:
    data = blob()
    target = make(version=(1, 0))
    before = target.snapshot()
    for i in range(len(data)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x40
        try:
            incoming = decode_envelope(bytes(corrupt))
            accept_incoming(None, incoming.pins, qemu_psci=(1, 1))
            target.restore(incoming.snapshot)
        except (IncompatibleState, VersionError):
            assert target.snapshot() == before, f"byte {i}: refused but changed state"
            continue
        # Only a flip in a field without meaning for the guest (the VM's name) may pass, and then the
        # state is exactly the source's.
        assert target.snapshot() == source_state(), f"byte {i}: accepted a changed state"
        target = make(version=(1, 0))


def test_a_pin_this_qemu_cannot_honour_is_refused() -> None:
    incoming = decode_envelope(encode_envelope(VersionPins((1, 1), 0, (1, 1)), IDENTITY, b"", source_running=False))
    with pytest.raises(VersionError, match="cannot honour"):
        accept_incoming(None, incoming.pins, qemu_psci=(1, 0))
