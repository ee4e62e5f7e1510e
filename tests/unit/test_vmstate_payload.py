"""The migration payload: pins plus a dispatcher snapshot, and every way a blob is refused."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from qmp_sdei.errors import IncompatibleState
from qmp_sdei.versions import VersionPins
from qmp_sdei.vmstate.payload import PAYLOAD_MAGIC, decode_payload, encode_payload
from support.sdei import PRIVATE, make, register

PINS = VersionPins(sdei=(1, 1), sdei_vendor=0, psci=(1, 0))


def payload() -> bytes:
    d = make()
    register(d, 0, PRIVATE)
    return encode_payload(PINS, d.snapshot())


def test_round_trip() -> None:
    d = make()
    register(d, 1, PRIVATE)
    decoded = decode_payload(encode_payload(PINS, d.snapshot()))
    assert decoded.pins == PINS
    assert decoded.info.mpidrs == d.mpidrs
    other = make()
    other.restore(decoded.snapshot)
    assert other == d


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
    header = struct.pack(">8sHHII", PAYLOAD_MAGIC, version, flags, len(pins_text), zlib.crc32(pins_text))
    return header + pins_text + snapshot


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (lambda s: _framed(b'{"sdei":"1.1"}', s), "unusable pins"),
        (lambda s: _framed(b"[", s), "unusable pins"),
        (lambda s: _framed(json.dumps(PINS.to_dict()).encode(), s, version=2), "unknown migration payload version 2"),
        (lambda s: _framed(json.dumps(PINS.to_dict()).encode(), s, flags=1), "unknown flags"),
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
