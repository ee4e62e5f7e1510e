"""The migration payload: pins, the source's runstate and a dispatcher snapshot, and every way a
blob is refused (before the destination changes anything)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from qmp_sdei.errors import IncompatibleState, VersionError
from qmp_sdei.versions import VersionPins, accept_incoming
from qmp_sdei.vmstate.payload import FLAG_SOURCE_RUNNING, PAYLOAD_MAGIC, decode_payload, encode_payload
from support.sdei import PRIVATE, make, register

PINS = VersionPins(sdei=(1, 1), sdei_vendor=0, psci=(1, 0))


def payload() -> bytes:
    d = make()
    register(d, 0, PRIVATE)
    return encode_payload(PINS, d.snapshot())


@pytest.mark.parametrize("running", [True, False])
def test_round_trip(running: bool) -> None:
    d = make()
    register(d, 1, PRIVATE)
    decoded = decode_payload(encode_payload(PINS, d.snapshot(), source_running=running))
    assert decoded.pins == PINS
    assert decoded.source_running is running
    assert decoded.info.mpidrs == d.mpidrs
    other = make()
    other.restore(decoded.snapshot)
    assert other == d


def test_the_running_flag_is_bit_0_of_the_flags_and_covered_by_the_checksum() -> None:
    blob = encode_payload(PINS, make().snapshot(), source_running=True)
    (flags,) = struct.unpack_from(">H", blob, 10)
    assert flags == FLAG_SOURCE_RUNNING == 1
    cleared = blob[:10] + b"\0\0" + blob[12:]  # a damaged flag must not pass as "was paused"
    with pytest.raises(IncompatibleState, match="checksum"):
        decode_payload(cleared)


def test_every_flipped_byte_is_refused_or_harmless_and_a_refusal_changes_nothing() -> None:
    """Over the whole blob, as the destination uses it: decode, check the pins, restore."""
    source = make(version=(1, 0))
    register(source, 1, PRIVATE)
    blob = encode_payload(VersionPins((1, 0), 0, (1, 0)), source.snapshot(), source_running=True)
    target = make(version=(1, 0))
    before = target.snapshot()
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x40
        try:
            decoded = decode_payload(bytes(damaged))
            accept_incoming(None, decoded.pins, qemu_psci=(1, 1))
            target.restore(decoded.snapshot)
        except (IncompatibleState, VersionError):
            assert target.snapshot() == before, f"byte {i}: refused but changed the state"
            continue
        raise AssertionError(f"byte {i}: a damaged blob was accepted")


def test_a_pin_this_qemu_cannot_honour_is_refused() -> None:
    d = make()
    decoded = decode_payload(encode_payload(VersionPins((1, 1), 0, (1, 1)), d.snapshot()))
    with pytest.raises(VersionError, match="cannot honour"):
        accept_incoming(None, decoded.pins, qemu_psci=(1, 0))


def test_every_cut_and_every_flipped_byte_of_the_header_and_pins_is_refused() -> None:
    blob = payload()
    (pins_length,) = struct.unpack_from(">I", blob, 12)
    covered = 20 + pins_length + 20  # header, pins, and the snapshot's own header
    for cut in range(covered):
        with pytest.raises(IncompatibleState):
            decode_payload(blob[:cut])
    for i in range(covered):
        damaged = bytearray(blob)
        damaged[i] ^= 0x40
        with pytest.raises(IncompatibleState):
            decode_payload(bytes(damaged))


def _framed(pins_text: bytes, snapshot: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    crc = zlib.crc32(pins_text, zlib.crc32(struct.pack(">HH", version, flags)))
    header = struct.pack(">8sHHII", PAYLOAD_MAGIC, version, flags, len(pins_text), crc)
    return header + pins_text + snapshot


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (lambda s: _framed(b'{"sdei":"1.1"}', s), "unusable pins"),
        (lambda s: _framed(b"[", s), "unusable pins"),
        (lambda s: _framed(json.dumps(PINS.to_dict()).encode(), s, version=2), "unknown migration payload version 2"),
        (lambda s: _framed(json.dumps(PINS.to_dict()).encode(), s, flags=2), "unknown flags 0x2"),
        (lambda s: b"XXXXXXXX" + _framed(json.dumps(PINS.to_dict()).encode(), s)[8:], "bad magic"),
        (lambda s: _framed(json.dumps({**PINS.to_dict(), "sdei": "1.0"}).encode(), s), "inconsistent"),
        (lambda s: _framed(json.dumps({**PINS.to_dict(), "sdei_vendor": 9}).encode(), s), "inconsistent"),
        (lambda s: _framed(json.dumps(PINS.to_dict()).encode(), b""), "truncated"),
        (lambda s: "text", "must be bytes"),
    ],
)
def test_bad_payloads_are_refused(blob: object, match: str) -> None:
    snapshot = make().snapshot()
    with pytest.raises(IncompatibleState, match=match):
        decode_payload(blob(snapshot))  # type: ignore[operator]
