"""Snapshot format: round trips, size, and every rejection path (which must change nothing)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from qmp_sdei.errors import IncompatibleState
from qmp_sdei.sdei import Dispatcher, EventSpec, peek, snapshot
from qmp_sdei.sdei.dispatcher import DispatchFrame
from qmp_sdei.sdei.snapshot import HEADER, MAGIC, encode_v1, state_document
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
    assert info.format_version == 2


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
    _rejected_unchanged(make(), _reframe(doc, version=3), "unknown state format version 3")
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


# -- format version 2 (binary records) --------------------------------------------------------------


def test_version_1_blobs_still_restore() -> None:
    d = busy()
    other = make()
    other.restore(encode_v1(d))
    assert other == d
    assert peek(encode_v1(d)).format_version == 1


def test_every_flipped_byte_of_a_version_1_blob_is_rejected() -> None:
    blob = encode_v1(busy())
    target = make()
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x40
        with pytest.raises(IncompatibleState):
            target.restore(bytes(damaged))
    assert target == make()


def test_large_bodies_are_compressed_and_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    d = busy()
    assert HEADER.unpack_from(d.snapshot())[2] == 0  # small: stored as is
    monkeypatch.setattr(snapshot, "COMPRESS_ABOVE", 64)
    blob = d.snapshot()
    assert HEADER.unpack_from(blob)[2] == snapshot.FLAG_ZLIB
    other = make()
    other.restore(blob)
    assert other == d


def _body(blob: bytes) -> bytes:
    return blob[HEADER.size :]


def _reframe_body(body: bytes) -> bytes:
    return HEADER.pack(MAGIC, 2, 0, len(body), zlib.crc32(body)) + body


def test_every_cut_of_a_version_2_body_is_refused() -> None:
    """A body cut short, with a valid envelope around it, is refused at every length."""
    body = _body(busy().snapshot())
    target = busy()
    call(target, 0, F.PE_MASK)
    for cut in range(len(body)):
        _rejected_unchanged(target, _reframe_body(body[:cut]), "corrupted")


def test_version_2_body_framing_errors_are_refused() -> None:
    body = _body(busy().snapshot())
    (identity_length,) = struct.unpack_from(">I", body)
    _rejected_unchanged(make(), _reframe_body(body + b"\0"), "1 bytes after the last record")
    _rejected_unchanged(make(), _reframe_body(struct.pack(">I", len(body)) + body[4:]), "runs past the end")
    not_json = body[:4] + b"[" + body[5:]
    _rejected_unchanged(make(), _reframe_body(not_json), "undecodable identity")
    not_object = struct.pack(">I", 2) + b"[]" + body[4 + identity_length :]
    _rejected_unchanged(make(), _reframe_body(not_object), "identity is not an object")


def _mutated(mutate: object) -> bytes:
    """A version 2 blob of busy() after editing its objects into something no guest can produce."""
    d = busy()
    mutate(d)  # type: ignore[operator]
    return d.snapshot()


def _frame_on(d: Dispatcher, event: int) -> None:
    d.vcpus[0].stack.append(DispatchFrame(event, [0] * 18, 0, 0))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.vcpus.pop(), "lists 1 vCPUs"),
        (lambda d: setattr(d.vcpus[0], "masked", 2), "masked flag is 2"),
        (lambda d: setattr(d.vcpus[0].private[PRIVATE], "state", 2), "reachable EVENT_STATUS"),
        (lambda d: d.vcpus[0].private.update({SHARED: d.vcpus[0].private[PRIVATE]}), "not a private event"),
        (lambda d: setattr(d.vcpus[0].stack[1], "event", 999), "not in this catalogue"),
        (lambda d: _frame_on(d, PRIVATE), "3 nested handlers"),
        (lambda d: d.vcpus[0].stack.pop(), "running flag"),
        (lambda d: d.vcpus[0].stack.reverse(), "impossible order"),
        (lambda d: setattr(d.shared[SHARED], "route_mode", 7), "routing mode"),
        (lambda d: d.shared.update({PRIVATE: d.shared[SHARED]}), "not a shared event"),
        (lambda d: d.bindings.update({SHARED: 5}), "not a new dynamic event"),
        (lambda d: d.pending.add((None, PRIVATE)), "wrong kind of target"),
        (lambda d: d.pending.add((0, 999)), "unknown event"),
        (lambda d: d.shared[SHARED].__dict__.update(route_mode=1, affinity=0x77), "routed to unknown PE"),
        (lambda d: setattr(d.shared[SHARED], "affinity", 1), "affinity in RM_ANY"),
        (lambda d: d.bindings.update({0x4000_0002: 20}), "bound to two events"),
        (lambda d: d.bindings.update({0x4000_0000: 41}), "of the wrong kind"),
        (lambda d: d.bindings.pop(0x4000_0000), "registered but not bound"),
        (lambda d: d.vcpus[0].private[0].__dict__.update(state=0), "pending but not registered"),
    ],
)
def test_impossible_version_2_states_are_refused(mutate: object, match: str) -> None:
    _rejected_unchanged(make(), _mutated(mutate), match)


def test_repeated_version_2_records_are_refused() -> None:
    """Records the writer never repeats: a second copy of a registration, binding or trigger."""
    d = busy()
    body = _body(d.snapshot())
    (identity_length,) = struct.unpack_from(">I", body)
    vcpu0 = 4 + identity_length + 4  # identity length, identity, vCPU count
    masked, frames, registered = struct.unpack_from(">BBI", body, vcpu0)
    first_event = body[vcpu0 + 6 : vcpu0 + 6 + 21]
    doubled = body[:vcpu0] + struct.pack(">BBI", masked, frames, registered + 1) + first_event + body[vcpu0 + 6 :]
    _rejected_unchanged(make(), _reframe_body(doubled), "vCPU 0 lists event 0 twice")
    state_at = vcpu0 + 6 + 4  # the first registration's EVENT_STATUS byte
    unregistered = body[:state_at] + b"\0" + body[state_at + 1 :]
    _rejected_unchanged(make(), _reframe_body(unregistered), "vCPU 0 event 0 is listed but unregistered")
    tail = d.snapshot()[-8:]  # the last pending trigger
    count_at = len(body) - 4 - 8 * len(d.pending)
    more = body[:count_at] + struct.pack(">I", len(d.pending) + 1) + body[count_at + 4 :] + tail
    _rejected_unchanged(make(), _reframe_body(more), "is listed twice")
