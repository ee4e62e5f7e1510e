"""What rides a migration for one VM: the pinned versions and the dispatcher snapshot, as one blob.

The dispatcher snapshot carries the SDEI version and vendor the guest was shown, but not the PSCI
version, which the sidecar pins too (``versions.VersionPins``). A destination must present the
same PSCI version as the source, so the blob that ``Save()`` returns wraps both::

    offset  size  field
    0       8     magic b"QSDEIMIG"
    8       2     payload format version, big-endian (1)
    10      2     flags, big-endian: bit 0 ``FLAG_SOURCE_RUNNING``; other bits are refused
    12      4     pins length P, big-endian
    16      4     CRC-32 of bytes 8..12 (version, flags) followed by the pins bytes, big-endian
    20      P     pins: UTF-8 JSON object ``VersionPins.to_dict()`` (sdei, sdei_vendor, psci)
    20+P    n     the dispatcher snapshot (its own envelope and checksum, ``docs/snapshot-format.md``)

:func:`decode_payload` checks the frame and the pins and the snapshot's envelope (``peek``); it does
not restore anything. ``FLAG_SOURCE_RUNNING`` says the guest was running on the source when the
migration stopped it, so the destination runs it once it has arrived (a guest its owner had paused
stays paused). The caller then checks the pins (``versions.accept_incoming``) and restores
the snapshot into a dispatcher, so a refusal at any step changes nothing.

What it must not do: decide whether a state is acceptable here (pins policy, dispatcher identity).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from qmp_sdei.errors import IncompatibleState, VersionError
from qmp_sdei.sdei import SnapshotInfo, peek
from qmp_sdei.versions import VersionPins

__all__ = ["FLAG_SOURCE_RUNNING", "PAYLOAD_MAGIC", "MigrationPayload", "decode_payload", "encode_payload"]

PAYLOAD_MAGIC: Final = b"QSDEIMIG"
PAYLOAD_VERSION: Final = 1
_HEADER: Final = struct.Struct(">8sHHII")
_CHECKED: Final = struct.Struct(">HH")  # version and flags: covered by the checksum with the pins
FLAG_SOURCE_RUNNING: Final = 0x0001
_KNOWN_FLAGS: Final = FLAG_SOURCE_RUNNING


@dataclass(frozen=True)
class MigrationPayload:
    pins: VersionPins
    snapshot: bytes
    info: SnapshotInfo  # the snapshot's identity, read without restoring it
    source_running: bool = False  # the guest ran on the source until the migration stopped it


def _checksum(version: int, flags: int, text: bytes) -> int:
    return zlib.crc32(text, zlib.crc32(_CHECKED.pack(version, flags)))


def encode_payload(pins: VersionPins, snapshot: bytes, *, source_running: bool = False) -> bytes:
    """The blob ``Save()`` returns: ``pins``, a ``Dispatcher.snapshot()`` and the source's runstate."""
    text = json.dumps(pins.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    flags = FLAG_SOURCE_RUNNING if source_running else 0
    crc = _checksum(PAYLOAD_VERSION, flags, text)
    return _HEADER.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, flags, len(text), crc) + text + snapshot


def decode_payload(blob: bytes) -> MigrationPayload:
    """Split and check a blob ``Load()`` received.

    :raise IncompatibleState: not a payload, an unknown payload version or flag, damaged or
        malformed pins, a snapshot whose envelope is damaged or of an unknown format, or pins
        that disagree with the snapshot's own SDEI version and vendor.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise IncompatibleState(f"migration payload must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _HEADER.size:
        raise IncompatibleState(f"migration payload is truncated: {len(blob)} bytes")
    magic, version, flags, length, crc = _HEADER.unpack_from(blob)
    if magic != PAYLOAD_MAGIC:
        raise IncompatibleState("not a qmp-sdei migration payload (bad magic)")
    if version != PAYLOAD_VERSION:
        raise IncompatibleState(f"unknown migration payload version {version} (this build reads {PAYLOAD_VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise IncompatibleState(f"migration payload uses unknown flags {flags & ~_KNOWN_FLAGS:#x}")
    end = _HEADER.size + length
    if end > len(blob):
        raise IncompatibleState(f"migration payload is truncated: pins need {length} bytes")
    text = blob[_HEADER.size : end]
    if _checksum(version, flags, text) != crc:
        raise IncompatibleState("migration payload is corrupted (header and pins checksum mismatch)")
    try:
        pins = VersionPins.from_dict(json.loads(text.decode()))
    except (UnicodeDecodeError, json.JSONDecodeError, VersionError) as err:
        raise IncompatibleState(f"migration payload has unusable pins: {err}") from err
    snapshot = blob[end:]
    info = peek(snapshot)
    if (info.sdei_version, info.vendor) != (pins.sdei, pins.sdei_vendor):
        raise IncompatibleState(
            f"migration payload is inconsistent: pins say SDEI {pins.sdei} vendor {pins.sdei_vendor:#x}, "
            f"the snapshot says SDEI {info.sdei_version} vendor {info.vendor:#x}"
        )
    return MigrationPayload(pins, snapshot, info, source_running=bool(flags & FLAG_SOURCE_RUNNING))
