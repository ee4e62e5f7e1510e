"""Snapshot format: round trips, size, and every rejection path (which must change nothing)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from qmp_sdei.errors import IncompatibleState
from qmp_sdei.sdei import Dispatcher, EventSpec, peek
from qmp_sdei.sdei.snapshot import HEADER, MAGIC, state_document
from support.sdei import CRITICAL, PRIVATE, SHARED, F, call, make, register, run_handler


def busy(vcpus: int = 2, **kw: object) -> Dispatcher:
    """A dispatcher with something in every part of the state."""
    d = make(vcpus=vcpus, **kw)  # type: ignore[arg-type]
    for v in range(vcpus):
        register(d, v, PRIVATE)
        register(d, v, CRITICAL)
        register(d, v, 0, enable=False)
    register(d, 0, SHARED)
    call(d, 0, F.EVENT_ROUTING_SET, SHARED, 0, 0)
    register(d, 0, call(d, 0, F.INTERRUPT_BIND, 20))  # a bound dynamic event, registered
    call(d, 0, F.INTERRUPT_BIND, 40)
    for v in range(vcpus):
        regs = run_handler(d, v, PRIVATE, seed=(v + 1) << 40)
        d.trigger(CRITICAL, v)
        d.deliver(v, regs)
        d.trigger(0, v)
    d.trigger(SHARED)
    return d


def test_round_trip_gives_an_equal_dispatcher() -> None:
    d = busy()
    other = make()
    assert other != d
    other.restore(d.snapshot())
    assert other == d
    assert other.snapshot() == d.snapshot()


def test_restored_dispatcher_behaves_the_same() -> None:
    d = busy()
    other = make()
    other.restore(d.snapshot())
    for v in range(2):
        assert [call(other, v, F.EVENT_CONTEXT, i) for i in range(18)] == [
            call(d, v, F.EVENT_CONTEXT, i) for i in range(18)
        ]
        assert call(other, v, F.EVENT_COMPLETE, 0) == call(d, v, F.EVENT_COMPLETE, 0)
    assert other == d


def test_peek_reads_identity() -> None:
    info = peek(make(version=(1, 0), profile="kvm", vendor=7).snapshot())
    assert info.sdei_version == (1, 0)
    assert info.vendor == 7
    assert info.profile == "kvm"
    assert info.mpidrs == (0, 1)
    assert (PRIVATE, False, False) in info.catalogue
    assert info.format_version == 1


@pytest.mark.parametrize(("vcpus", "limit"), [(8, 16 * 1024), (64, 64 * 1024)])
def test_snapshot_is_small(vcpus: int, limit: int) -> None:
    assert len(busy(vcpus).snapshot()) < limit


def _rejected_unchanged(target: Dispatcher, blob: bytes, match: str) -> None:
    before = target.snapshot()
    with pytest.raises(IncompatibleState, match=match):
        target.restore(blob)
    assert target.snapshot() == before


def test_truncated_blobs_are_rejected() -> None:
    blob = busy().snapshot()
    target = busy()
    call(target, 0, F.PE_MASK)
    for cut in range(len(blob)):
        _rejected_unchanged(target, blob[:cut], "truncated")


def test_every_flipped_byte_is_rejected() -> None:
    blob = busy().snapshot()
    target = make()
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x40
        with pytest.raises(IncompatibleState):
            target.restore(bytes(damaged))
    assert target == make()


def _reframe(doc: object, version: int = 1, flags: int = 1) -> bytes:
    body = json.dumps(doc).encode()
    if flags & 1:
        body = zlib.compress(body)
    return HEADER.pack(MAGIC, version, flags, len(body), zlib.crc32(body)) + body


def _doc(d: Dispatcher) -> dict[str, object]:
    return state_document(d)


def test_unknown_format_version_and_flags_and_magic() -> None:
    doc = _doc(make())
    _rejected_unchanged(make(), _reframe(doc, version=2), "unknown state format version 2")
    _rejected_unchanged(make(), _reframe(doc, flags=3), "unknown flags")
    _rejected_unchanged(make(), b"X" * 8 + _reframe(doc)[8:], "bad magic")
    _rejected_unchanged(make(), _reframe(doc) + b"\0", "trailing")
    _rejected_unchanged(make(), "not bytes", "must be bytes")  # type: ignore[arg-type]


def test_uncompressed_body_is_accepted() -> None:
    d = busy()
    other = make()
    other.restore(_reframe(_doc(d), flags=0))
    assert other == d


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (lambda: make(vcpus=3), "for 2 vCPUs, this VM has 3"),
        (lambda: make(version=(1, 0)), "SDEI version"),
        (lambda: make(vendor=5), "vendor"),
        (lambda: make(profile="kvm", vendor=0), "profile"),
        (lambda: make(bind_slots=(1, 1)), "bind slots"),
        (lambda: Dispatcher(events=[EventSpec(1000)], mpidrs=[0, 1], version=(1, 1), bind_slots=(3, 3)), "catalogue"),
        (
            lambda: Dispatcher(events=make().catalogue, mpidrs=[0, 0x100], version=(1, 1), bind_slots=(3, 3)),
            "MPIDRs",
        ),
    ],
)
def test_incompatible_dispatcher_is_refused(other: object, match: str) -> None:
    target = other()  # type: ignore[operator]
    _rejected_unchanged(target, busy().snapshot(), match)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda doc: doc["vcpus"].pop(), "lists 1 vCPUs"),
        (lambda doc: doc["vcpus"][0].__setitem__("masked", "no"), "masked must be true or false"),
        (lambda doc: doc["vcpus"][0]["events"][0].__setitem__("state", 2), "reachable EVENT_STATUS"),
        (lambda doc: doc["vcpus"][0]["events"][0].__setitem__("entry", -1), "unsigned 64-bit"),
        (lambda doc: doc["vcpus"][0]["events"][0].__setitem__("event", SHARED), "not a private event"),
        (lambda doc: doc["vcpus"][0]["stack"][0]["x"].pop(), "must hold 18"),
        (lambda doc: doc["vcpus"][0]["stack"].pop(), "running flag"),
        (lambda doc: doc["vcpus"][0]["stack"].reverse(), "impossible order"),
        (lambda doc: doc["shared"][0].__setitem__("route", 7), "routing mode"),
        (lambda doc: doc["bindings"].append([SHARED, 5]), "bindings"),
        (lambda doc: doc["pending"].append([-1, PRIVATE]), "wrong kind of target"),
        (lambda doc: doc.pop("vcpus"), "vcpus is missing"),
        (lambda doc: doc["shared"][0].update(route=1, affinity=0x77), "routed to unknown PE"),
        (lambda doc: doc["shared"][0].update(affinity=1), "affinity in RM_ANY"),
        (lambda doc: doc["bindings"].append([0x4000_0002, 20]), "bound to two events"),
        (lambda doc: doc["bindings"].__setitem__(0, [0x4000_0000, 41]), "of the wrong kind"),
        (lambda doc: doc["bindings"].pop(0), "registered but not bound"),
        (lambda doc: doc["vcpus"][0]["events"].pop(0), "pending but not registered"),
    ],
)
def test_inconsistent_documents_are_refused(mutate: object, match: str) -> None:
    doc = json.loads(json.dumps(_doc(busy())))
    mutate(doc)  # type: ignore[operator]
    _rejected_unchanged(make(), _reframe(doc), match)


def test_zip_bomb_is_refused() -> None:
    body = zlib.compress(b" " * (32 * 1024 * 1024))
    blob = struct.pack(">8sHHII", MAGIC, 1, 1, len(body), zlib.crc32(body)) + body
    _rejected_unchanged(make(), blob, "inflates beyond")
