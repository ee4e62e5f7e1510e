"""The dispatcher's state as bytes: the format that rides migrations and the sidecar's state file.

Layout (documented for other implementations in ``docs/snapshot-format.md``)::

    offset  size  field
    0       8     magic  b"QSDEIST\\0"
    8       2     format version, big-endian (this build writes 2, reads 1 and 2)
    10      2     flags, big-endian; bit 0 = body is zlib-compressed
    12      4     body length in bytes, big-endian
    16      4     CRC-32 of the body bytes as stored, big-endian
    20      n     body

Version 2 (written): the body is the writer's identity as a small JSON object (SDEI version and
vendor, profile, catalogue, MPIDRs, bind slots), then the state in fixed big-endian binary records
(per-vCPU mask, dispatch stack with saved contexts and private registrations; shared registrations;
bindings; pending triggers). Binary records because ``snapshot()`` sits on the guest's critical path
(every conduit stop, and a migration's downtime): turning hundreds of 64-bit registers into JSON
text cost ten times more than packing them. The body is zlib-compressed only when it is larger
than ``COMPRESS_ABOVE``.

Version 1 (read only): the body is one JSON document (``state_document``), zlib-compressed.

Restoring validates the whole blob into new objects before anything is swapped in, so a rejected
blob changes nothing. Decoders of older format versions are kept forever: add a new version rather
than editing an old one.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmp_sdei.abi import sdei as abi
from qmp_sdei.errors import IncompatibleState
from qmp_sdei.sdei.state import HandlerState

if TYPE_CHECKING:
    from qmp_sdei.sdei.dispatcher import Dispatcher, DispatchFrame, EventInstance, VcpuState

MAGIC = b"QSDEIST\x00"
FORMAT_VERSION = 2  # what encode() writes
FLAG_ZLIB = 1
HEADER = struct.Struct(">8sHHII")
MAX_BODY = 16 * 1024 * 1024  # refuse to inflate beyond this: a state is kilobytes, not megabytes
U64_MAX = (1 << 64) - 1
# Bodies are stored as they are unless larger than this; then zlib level 1. Half of what QEMU's
# dbus-vmstate carries per helper (1 MiB): compressing a typical state costs about as much time
# as packing it, and snapshot() runs while a migrating VM is stopped.
COMPRESS_ABOVE = 512 * 1024

# Version 2 body records, all big-endian (see docs/snapshot-format.md).
_U32 = struct.Struct(">I")
_VCPU = struct.Struct(">BBI")  # masked, dispatch frames, registered private instances
_PRIVATE = struct.Struct(">IBQQ")  # event, EVENT_STATUS, entry point, argument
_FRAME = struct.Struct(f">I{abi.SAVED_GPRS}QQQ")  # event, x0..x17, pc, pstate
_SHARED = struct.Struct(">IBQQBQ")  # event, EVENT_STATUS, entry point, argument, routing mode, affinity
_BINDING = struct.Struct(">II")  # dynamic event, interrupt id
_PENDING = struct.Struct(">iI")  # vCPU index (-1: shared event), event


@dataclass(frozen=True)
class SnapshotInfo:
    """What a blob says about the dispatcher that wrote it, readable without a dispatcher."""

    format_version: int
    sdei_version: tuple[int, int]
    vendor: int
    profile: str
    catalogue: tuple[tuple[int, bool, bool], ...]  # (number, shared, critical)
    mpidrs: tuple[int, ...]
    bind_slots: tuple[int, int]


# -- writing ---------------------------------------------------------------------------------------


def _instance_doc(number: int, inst: EventInstance, *, shared: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {"event": number, "state": int(inst.state), "entry": inst.entry_point}
    doc["arg"] = inst.argument
    if shared:
        doc["route"] = inst.route_mode
        doc["affinity"] = inst.affinity
    return doc


def _frame_doc(frame: DispatchFrame) -> dict[str, Any]:
    return {"event": frame.event, "x": list(frame.saved_x), "pc": frame.pc, "pstate": frame.pstate}


def _vcpu_doc(vcpu: VcpuState) -> dict[str, Any]:
    return {
        "masked": vcpu.masked,
        "stack": [_frame_doc(f) for f in vcpu.stack],
        "events": [
            _instance_doc(n, inst, shared=False)
            for n, inst in sorted(vcpu.private.items())
            if inst.state is not HandlerState.UNREGISTERED
        ],
    }


def _identity_document(d: Dispatcher) -> dict[str, Any]:
    return {
        "sdei_version": list(d.version),
        "vendor": d.vendor,
        "profile": d.profile.name,
        "catalogue": [[s.number, s.shared, s.critical] for s in d.catalogue],
        "mpidrs": list(d.mpidrs),
        "bind_slots": list(d.bind_slots),
    }


def state_document(d: Dispatcher) -> dict[str, Any]:
    """The canonical, JSON-ready description of a dispatcher (identity plus state).

    It is the version 1 body, and what dispatcher equality compares.
    """
    doc = _identity_document(d)
    doc.update(
        vcpus=[_vcpu_doc(v) for v in d.vcpus],
        shared=[
            _instance_doc(n, inst, shared=True)
            for n, inst in sorted(d.shared.items())
            if inst.state is not HandlerState.UNREGISTERED
        ],
        bindings=[[n, intid] for n, intid in sorted(d.bindings.items())],
        pending=sorted([[-1 if v is None else v, n] for v, n in d.pending]),
    )
    return doc


def encode_v1(d: Dispatcher) -> bytes:
    """The version 1 blob (JSON body, zlib level 1): for tests and tools that need an old blob."""
    body = zlib.compress(json.dumps(state_document(d), separators=(",", ":"), sort_keys=True).encode(), 1)
    return HEADER.pack(MAGIC, 1, FLAG_ZLIB, len(body), zlib.crc32(body)) + body


def encode(d: Dispatcher) -> bytes:
    """The version 2 blob: identity JSON, then the state as binary records.

    It encodes the objects as they are, without judging them: a dispatcher whose attributes were
    edited by hand into an impossible state still gets a blob, and restoring that blob refuses it.
    Private instances are written in the dictionary's order, which every dispatcher builds the same
    way (``fresh_private_instances``), so equal dispatchers give equal blobs.
    """
    identity = json.dumps(_identity_document(d), separators=(",", ":"), sort_keys=True).encode()
    parts = [_U32.pack(len(identity)), identity, _U32.pack(len(d.vcpus))]
    append, private_pack, frame_pack = parts.append, _PRIVATE.pack, _FRAME.pack
    for vcpu in d.vcpus:
        registered = [(n, inst) for n, inst in vcpu.private.items() if inst.state]
        append(_VCPU.pack(vcpu.masked, len(vcpu.stack), len(registered)))
        for number, inst in registered:
            append(private_pack(number, inst.state, inst.entry_point, inst.argument))
        for f in vcpu.stack:
            append(frame_pack(f.event, *f.saved_x, f.pc, f.pstate))
    shared = [(n, inst) for n, inst in sorted(d.shared.items()) if inst.state]
    append(_U32.pack(len(shared)))
    for number, inst in shared:
        append(_SHARED.pack(number, inst.state, inst.entry_point, inst.argument, inst.route_mode, inst.affinity))
    append(_U32.pack(len(d.bindings)))
    parts.extend(_BINDING.pack(n, intid) for n, intid in sorted(d.bindings.items()))
    append(_U32.pack(len(d.pending)))
    parts.extend(_PENDING.pack(v, n) for v, n in sorted((-1 if v is None else v, n) for v, n in d.pending))
    body, flags = b"".join(parts), 0
    if len(body) > COMPRESS_ABOVE:
        body, flags = zlib.compress(body, 1), FLAG_ZLIB
    return HEADER.pack(MAGIC, FORMAT_VERSION, flags, len(body), zlib.crc32(body)) + body


# -- reading ---------------------------------------------------------------------------------------


def _read_body(blob: bytes) -> tuple[int, bytes]:
    """Check the envelope; return the format version and the (inflated) body."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise IncompatibleState(f"state must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < HEADER.size:
        raise IncompatibleState(f"state is truncated: {len(blob)} bytes, the header alone is {HEADER.size}")
    magic, version, flags, length, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IncompatibleState("not a qmp-sdei state (bad magic)")
    if version not in _FORMATS:
        raise IncompatibleState(
            f"unknown state format version {version} (this build reads {', '.join(map(str, _FORMATS))})"
        )
    body = blob[HEADER.size :]
    if len(body) < length:
        raise IncompatibleState(f"state is truncated: body has {len(body)} of {length} bytes")
    if len(body) > length:
        raise IncompatibleState(f"state has {len(body) - length} unexpected trailing bytes")
    if zlib.crc32(body) != crc:
        raise IncompatibleState("state is corrupted (checksum mismatch)")
    if flags & ~FLAG_ZLIB:
        raise IncompatibleState(f"state uses unknown flags {flags:#x}")
    if flags & FLAG_ZLIB:
        try:
            inflater = zlib.decompressobj()
            body = inflater.decompress(body, MAX_BODY)
        except zlib.error as err:
            raise IncompatibleState(f"state is corrupted (undecodable body: {err})") from err
        if inflater.unconsumed_tail:
            raise IncompatibleState(f"state body inflates beyond {MAX_BODY} bytes")
    return version, body


def _json_object(text: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IncompatibleState(f"state is corrupted (undecodable {what}: {err})") from err
    if not isinstance(doc, dict):
        raise IncompatibleState(f"state is corrupted ({what} is not an object)")
    return doc


class _Reader:
    """Typed field access that turns every surprise into IncompatibleState naming the field."""

    def __init__(self, doc: dict[str, Any], where: str = "") -> None:
        self.doc, self.where = doc, where

    def fail(self, key: str, problem: str) -> IncompatibleState:
        return IncompatibleState(f"state is corrupted: {self.where}{key} {problem}")

    def get(self, key: str) -> Any:
        if key not in self.doc:
            raise self.fail(key, "is missing")
        return self.doc[key]

    def u64(self, key: str) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
            raise self.fail(key, f"must be an unsigned 64-bit integer, got {value!r}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def items(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(key, "must be a list")
        return value

    def child(self, key: str, value: Any) -> _Reader:
        if not isinstance(value, dict):
            raise self.fail(key, "must be an object")
        return _Reader(value, f"{self.where}{key}.")


def _identity(doc: dict[str, Any], format_version: int) -> SnapshotInfo:
    r = _Reader(doc)
    try:
        version = tuple(int(v) for v in r.items("sdei_version"))
        catalogue = tuple((int(n), bool(s), bool(c)) for n, s, c in r.items("catalogue"))
        mpidrs = tuple(int(m) for m in r.items("mpidrs"))
        slots = tuple(int(n) for n in r.items("bind_slots"))
        profile = r.get("profile")
    except (TypeError, ValueError) as err:
        raise IncompatibleState(f"state is corrupted: bad identity fields ({err})") from err
    if len(version) != 2 or len(slots) != 2 or not isinstance(profile, str):
        raise IncompatibleState("state is corrupted: bad identity fields")
    return SnapshotInfo(
        format_version=format_version,
        sdei_version=(version[0], version[1]),
        vendor=r.u64("vendor"),
        profile=profile,
        catalogue=catalogue,
        mpidrs=mpidrs,
        bind_slots=(slots[0], slots[1]),
    )


def peek(blob: bytes) -> SnapshotInfo:
    """Validate the envelope and read the writer's identity, without restoring anything.

    The daemon uses it to build a dispatcher that can take a state (pinned versions, catalogue).
    """
    version, body = _read_body(blob)
    return _FORMATS[version].identity(body)


def _check_compatible(d: Dispatcher, info: SnapshotInfo) -> None:
    if len(d.mpidrs) != len(info.mpidrs):
        raise IncompatibleState(f"state is for {len(info.mpidrs)} vCPUs, this VM has {len(d.mpidrs)}")
    mine: dict[str, tuple[object, object]] = {
        "SDEI version": (d.version, info.sdei_version),
        "SDEI vendor": (d.vendor, info.vendor),
        "profile": (d.profile.name, info.profile),
        "event catalogue": (tuple((s.number, s.shared, s.critical) for s in d.catalogue), info.catalogue),
        "vCPU MPIDRs": (d.mpidrs, info.mpidrs),
        "bind slots": (d.bind_slots, info.bind_slots),
    }
    for what, (here, there) in mine.items():
        if here != there:
            raise IncompatibleState(f"state is from a dispatcher with a different {what}: {there} != {here}")


def _state_of(r: _Reader) -> HandlerState:
    raw = r.get("state")
    try:
        return HandlerState(raw)
    except (ValueError, TypeError):
        raise r.fail("state", f"is not a reachable EVENT_STATUS value: {raw!r}") from None


def _event_of(d: Dispatcher, r: _Reader, *, shared: bool) -> int:
    number = r.get("event")
    if not d.has_event(number) or d.spec(number).shared != shared:
        kind = "shared" if shared else "private"
        raise r.fail("event", f"{number!r} is not a {kind} event of this catalogue")
    return int(number)


def _decode_vcpus_v1(d: Dispatcher, root: _Reader) -> list[VcpuState]:
    from qmp_sdei.sdei.dispatcher import DispatchFrame, VcpuState  # noqa: PLC0415

    vcpu_docs = root.items("vcpus")
    if len(vcpu_docs) != len(d.mpidrs):
        raise root.fail("vcpus", f"lists {len(vcpu_docs)} vCPUs, expected {len(d.mpidrs)}")
    vcpus: list[VcpuState] = []
    for index, raw_vcpu in enumerate(vcpu_docs):
        rv = root.child(f"vcpus[{index}]", raw_vcpu)
        private = d.fresh_private_instances()
        for j, raw in enumerate(rv.items("events")):
            re_ = rv.child(f"events[{j}]", raw)
            inst = private[_event_of(d, re_, shared=False)]
            inst.state, inst.entry_point, inst.argument = _state_of(re_), re_.u64("entry"), re_.u64("arg")
        stack = []
        for j, raw in enumerate(rv.items("stack")):
            rf = rv.child(f"stack[{j}]", raw)
            saved = rf.items("x")
            if len(saved) != abi.SAVED_GPRS:
                raise rf.fail("x", f"must hold {abi.SAVED_GPRS} registers")
            regs = [_Reader({"x": v}, rf.where).u64("x") for v in saved]
            number = rf.get("event")
            if not d.has_event(number):
                raise rf.fail("event", f"{number!r} is not in this catalogue")
            stack.append(DispatchFrame(number, regs, rf.u64("pc"), rf.u64("pstate")))
        vcpus.append(VcpuState(d.mpidrs[index], rv.boolean("masked"), stack, private))

    return vcpus


def _decode_v1(d: Dispatcher, doc: dict[str, Any]) -> Callable[[], None]:
    """Build the new state from a v1 document; return a function that installs it."""
    from qmp_sdei.sdei.dispatcher import EventInstance  # noqa: PLC0415

    _check_compatible(d, _identity(doc, 1))
    root = _Reader(doc)

    vcpus = _decode_vcpus_v1(d, root)

    shared = {n: EventInstance() for n in d.shared}
    for j, raw in enumerate(root.items("shared")):
        rs = root.child(f"shared[{j}]", raw)
        inst = shared[_event_of(d, rs, shared=True)]
        inst.state, inst.entry_point, inst.argument = _state_of(rs), rs.u64("entry"), rs.u64("arg")
        inst.route_mode, inst.affinity = rs.u64("route"), rs.u64("affinity")
        if inst.route_mode not in (abi.RM_ANY, abi.RM_PE):
            raise rs.fail("route", f"{inst.route_mode} is not a routing mode")

    bindings: dict[int, int] = {}
    for pair in root.items("bindings"):
        if not (isinstance(pair, list) and len(pair) == 2 and d.is_dynamic(pair[0])):
            raise root.fail("bindings", f"entry {pair!r} is not [dynamic event, interrupt]")
        bindings[pair[0]] = int(pair[1])

    pending: set[tuple[int | None, int]] = set()
    for pair in root.items("pending"):
        if not (isinstance(pair, list) and len(pair) == 2 and d.has_event(pair[1])):
            raise root.fail("pending", f"entry {pair!r} is not [vCPU or -1, event]")
        vcpu, number = pair
        is_shared = d.spec(number).shared
        if (vcpu == -1) != is_shared or (not is_shared and not 0 <= vcpu < len(vcpus)):
            raise root.fail("pending", f"entry {pair!r} names the wrong kind of target")
        pending.add((None if is_shared else vcpu, number))

    _check_consistency(d, vcpus, shared)
    _check_reachable(d, vcpus, shared, bindings, pending)

    def install() -> None:
        d.vcpus, d.shared, d.bindings, d.pending = vcpus, shared, bindings, pending

    return install


def _check_consistency(d: Dispatcher, vcpus: list[VcpuState], shared: dict[int, EventInstance]) -> None:
    """Running handlers and dispatch stacks must tell the same story, as they do in a live dispatcher."""
    running_shared: dict[int, int] = {}
    for index, vcpu in enumerate(vcpus):
        if len(vcpu.stack) > 2:
            raise IncompatibleState(f"state is corrupted: vCPU {index} has {len(vcpu.stack)} nested handlers")
        if len(vcpu.stack) == 2 and (d.spec(vcpu.stack[0].event).critical or not d.spec(vcpu.stack[1].event).critical):
            raise IncompatibleState(f"state is corrupted: vCPU {index} nests handlers in an impossible order")
        on_stack = {f.event for f in vcpu.stack}
        for number, inst in vcpu.private.items():
            if inst.state.running != (number in on_stack):
                raise IncompatibleState(f"state is corrupted: vCPU {index} event {number} running flag")
        for frame in vcpu.stack:
            if d.spec(frame.event).shared:
                if frame.event in running_shared:
                    raise IncompatibleState(f"state is corrupted: shared event {frame.event} runs twice")
                running_shared[frame.event] = index
    for number, inst in shared.items():
        if inst.state.running != (number in running_shared):
            raise IncompatibleState(f"state is corrupted: shared event {number} running flag")


def _check_reachable(
    d: Dispatcher,
    vcpus: list[VcpuState],
    shared: dict[int, EventInstance],
    bindings: dict[int, int],
    pending: set[tuple[int | None, int]],
) -> None:
    """Reject what no sequence of calls can produce: it would be state the guest never made."""
    from qmp_sdei.sdei.dispatcher import DYNAMIC_SHARED_BASE  # noqa: PLC0415

    for number, inst in shared.items():
        if inst.route_mode == abi.RM_PE and inst.affinity not in d.mpidrs:
            raise IncompatibleState(
                f"state is corrupted: shared event {number} routed to unknown PE {inst.affinity:#x}"
            )
        if inst.route_mode == abi.RM_ANY and inst.affinity:
            raise IncompatibleState(f"state is corrupted: shared event {number} has an affinity in RM_ANY")
    if len(set(bindings.values())) != len(bindings):
        raise IncompatibleState("state is corrupted: an interrupt is bound to two events")
    for number, intid in bindings.items():
        wanted = abi.SPI_RANGE if number >= DYNAMIC_SHARED_BASE else abi.PPI_RANGE
        if intid not in wanted:
            raise IncompatibleState(
                f"state is corrupted: event {number:#x} bound to interrupt {intid} of the wrong kind"
            )

    def instances(number: int) -> list[EventInstance]:
        return [shared[number]] if d.spec(number).shared else [v.private[number] for v in vcpus]

    for number in d.shared.keys() | vcpus[0].private.keys():
        bound_or_static = not d.is_dynamic(number) or number in bindings
        if not bound_or_static and any(inst.state is not HandlerState.UNREGISTERED for inst in instances(number)):
            raise IncompatibleState(f"state is corrupted: event {number:#x} is registered but not bound")
    for vcpu, number in pending:
        inst = shared[number] if vcpu is None else vcpus[vcpu].private[number]
        if not inst.state.registered:
            raise IncompatibleState(f"state is corrupted: event {number} is pending but not registered")


class _Records:
    """Reads version 2's binary records from a body, refusing anything that runs past its end."""

    def __init__(self, body: bytes, offset: int) -> None:
        self.body, self.pos = body, offset

    def one(self, record: struct.Struct, what: str) -> tuple[Any, ...]:
        end = self.pos + record.size
        if end > len(self.body):
            raise IncompatibleState(f"state is corrupted: the body ends inside {what}")
        values = record.unpack_from(self.body, self.pos)
        self.pos = end
        return values

    def count(self, what: str) -> int:
        return int(self.one(_U32, f"the number of {what}")[0])

    def many(self, record: struct.Struct, count: int, what: str) -> Iterator[tuple[Any, ...]]:
        end = self.pos + record.size * count
        if end > len(self.body):
            raise IncompatibleState(f"state is corrupted: the body ends inside {what} ({count} announced)")
        view = memoryview(self.body)[self.pos : end]
        self.pos = end
        return record.iter_unpack(view)

    def finish(self) -> None:
        if self.pos != len(self.body):
            raise IncompatibleState(f"state is corrupted: {len(self.body) - self.pos} bytes after the last record")


def _identity_v2(body: bytes) -> tuple[SnapshotInfo, int]:
    """The writer's identity and the offset where the state records start."""
    if len(body) < _U32.size:
        raise IncompatibleState("state is corrupted: the body ends inside the identity length")
    (length,) = _U32.unpack_from(body)
    end = _U32.size + length
    if end > len(body):
        raise IncompatibleState(f"state is corrupted: the identity ({length} bytes) runs past the end of the body")
    return _identity(_json_object(body[_U32.size : end], "identity"), 2), end


#: EVENT_STATUS values a version 2 record may hold: only registered instances are ever written.
_RECORDED_STATES = {int(state): state for state in HandlerState if state is not HandlerState.UNREGISTERED}


def _registered_state(raw: int, where: str) -> HandlerState:
    state = _RECORDED_STATES.get(raw)
    if state is None:
        if raw == HandlerState.UNREGISTERED:
            raise IncompatibleState(f"state is corrupted: {where} is listed but unregistered")
        raise IncompatibleState(f"state is corrupted: {where} state {raw} is not a reachable EVENT_STATUS value")
    return state


def _decode_vcpus_v2(d: Dispatcher, records: _Records) -> list[VcpuState]:
    from qmp_sdei.sdei.dispatcher import MAX_NESTING, DispatchFrame, VcpuState  # noqa: PLC0415

    count = records.count("vCPUs")
    if count != len(d.mpidrs):
        raise IncompatibleState(f"state is corrupted: vcpus lists {count} vCPUs, expected {len(d.mpidrs)}")
    vcpus: list[VcpuState] = []
    for index, mpidr in enumerate(d.mpidrs):
        where = f"vCPU {index}"
        masked, frames, registered = records.one(_VCPU, where)
        if masked > 1:
            raise IncompatibleState(f"state is corrupted: {where} masked flag is {masked}, not 0 or 1")
        if frames > MAX_NESTING:
            raise IncompatibleState(f"state is corrupted: {where} has {frames} nested handlers")
        private = d.fresh_private_instances()
        for number, raw_state, entry, argument in records.many(_PRIVATE, registered, f"{where}'s events"):
            inst = private.get(number)
            if inst is None:
                raise IncompatibleState(f"state is corrupted: {where} event {number} is not a private event")
            if inst.state is not HandlerState.UNREGISTERED:
                raise IncompatibleState(f"state is corrupted: {where} lists event {number} twice")
            inst.state = _registered_state(raw_state, f"{where} event {number}")
            inst.entry_point, inst.argument = entry, argument
        stack = []
        for number, *regs in records.many(_FRAME, frames, f"{where}'s dispatch frames"):
            if not d.has_event(number):
                raise IncompatibleState(f"state is corrupted: {where} runs event {number}, not in this catalogue")
            stack.append(DispatchFrame(number, regs[: abi.SAVED_GPRS], regs[-2], regs[-1]))
        vcpus.append(VcpuState(mpidr, bool(masked), stack, private))
    return vcpus


def _decode_v2(d: Dispatcher, body: bytes) -> Callable[[], None]:
    """Build the new state from a version 2 body; return a function that installs it."""
    from qmp_sdei.sdei.dispatcher import EventInstance  # noqa: PLC0415

    info, offset = _identity_v2(body)
    _check_compatible(d, info)
    records = _Records(body, offset)
    vcpus = _decode_vcpus_v2(d, records)

    shared = {n: EventInstance() for n in d.shared}
    count = records.count("shared registrations")
    for number, raw_state, entry, argument, route, affinity in records.many(_SHARED, count, "shared registrations"):
        inst = shared.get(number)
        if inst is None:
            raise IncompatibleState(f"state is corrupted: event {number} is not a shared event of this catalogue")
        if inst.state is not HandlerState.UNREGISTERED:
            raise IncompatibleState(f"state is corrupted: shared event {number} is listed twice")
        if route not in (abi.RM_ANY, abi.RM_PE):
            raise IncompatibleState(f"state is corrupted: shared event {number} route {route} is not a routing mode")
        inst.state = _registered_state(raw_state, f"shared event {number}")
        inst.entry_point, inst.argument, inst.route_mode, inst.affinity = entry, argument, route, affinity

    bindings: dict[int, int] = {}
    for number, intid in records.many(_BINDING, records.count("bindings"), "bindings"):
        if not d.is_dynamic(number) or number in bindings:
            raise IncompatibleState(
                f"state is corrupted: bindings entry [{number:#x}, {intid}] is not a new dynamic event"
            )
        bindings[number] = intid

    pending: set[tuple[int | None, int]] = set()
    for vcpu, number in records.many(_PENDING, records.count("pending triggers"), "pending triggers"):
        if not d.has_event(number):
            raise IncompatibleState(f"state is corrupted: pending entry [{vcpu}, {number}] names an unknown event")
        is_shared = d.spec(number).shared
        if (vcpu == -1) != is_shared or (not is_shared and not 0 <= vcpu < len(vcpus)):
            raise IncompatibleState(
                f"state is corrupted: pending entry [{vcpu}, {number}] names the wrong kind of target"
            )
        key = (None if is_shared else vcpu, number)
        if key in pending:
            raise IncompatibleState(f"state is corrupted: pending entry [{vcpu}, {number}] is listed twice")
        pending.add(key)
    records.finish()

    _check_consistency(d, vcpus, shared)
    _check_reachable(d, vcpus, shared, bindings, pending)

    def install() -> None:
        d.vcpus, d.shared, d.bindings, d.pending = vcpus, shared, bindings, pending

    return install


@dataclass(frozen=True)
class _Format:
    """How to read one format version's body."""

    identity: Callable[[bytes], SnapshotInfo]
    #: validates the body against a dispatcher; returns a function that installs the new state
    decode: Callable[[Dispatcher, bytes], Callable[[], None]]


_FORMATS: dict[int, _Format] = {
    1: _Format(
        identity=lambda body: _identity(_json_object(body, "body"), 1),
        decode=lambda d, body: _decode_v1(d, _json_object(body, "body")),
    ),
    2: _Format(identity=lambda body: _identity_v2(body)[0], decode=_decode_v2),
}


def decode_into(d: Dispatcher, blob: bytes) -> None:
    version, body = _read_body(blob)
    try:
        install = _FORMATS[version].decode(d, body)
    except IncompatibleState:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise IncompatibleState(f"state is corrupted: {err!r}") from err
    install()
