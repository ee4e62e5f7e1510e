"""The dispatcher's state as bytes: the format that rides migrations and the sidecar's state file.

Layout (documented for other implementations in ``docs/snapshot-format.md``)::

    offset  size  field
    0       8     magic  b"QSDEIST\\0"
    8       2     format version, big-endian (this build writes and reads 1)
    10      2     flags, big-endian; bit 0 = body is zlib-compressed
    12      4     body length in bytes, big-endian
    16      4     CRC-32 of the body bytes as stored, big-endian
    20      n     body: UTF-8 JSON (compact, sorted keys), zlib-compressed when flag bit 0

The JSON body is self-describing (named fields, see ``state_document``). It carries the identity of
the dispatcher that wrote it (SDEI version and vendor, profile, catalogue, MPIDRs, bind slots), and
the state: per-vCPU mask, dispatch stack with saved contexts and private registrations; shared
registrations; bindings; pending triggers. Restoring validates the whole blob into new objects
before anything is swapped in, so a rejected blob changes nothing.

Decoders of older format versions are kept forever: add ``_DECODERS[2]`` rather than editing 1.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmp_sdei.abi import sdei as abi
from qmp_sdei.errors import IncompatibleState
from qmp_sdei.sdei.state import HandlerState

if TYPE_CHECKING:
    from qmp_sdei.sdei.dispatcher import Dispatcher, DispatchFrame, EventInstance, VcpuState

MAGIC = b"QSDEIST\x00"
FORMAT_VERSION = 1
FLAG_ZLIB = 1
HEADER = struct.Struct(">8sHHII")
MAX_BODY = 16 * 1024 * 1024  # refuse to inflate beyond this: a state is kilobytes, not megabytes
U64_MAX = (1 << 64) - 1


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


def state_document(d: Dispatcher) -> dict[str, Any]:
    """The canonical, JSON-ready description of a dispatcher (identity plus state)."""
    return {
        "sdei_version": list(d.version),
        "vendor": d.vendor,
        "profile": d.profile.name,
        "catalogue": [[s.number, s.shared, s.critical] for s in d.catalogue],
        "mpidrs": list(d.mpidrs),
        "bind_slots": list(d.bind_slots),
        "vcpus": [_vcpu_doc(v) for v in d.vcpus],
        "shared": [
            _instance_doc(n, inst, shared=True)
            for n, inst in sorted(d.shared.items())
            if inst.state is not HandlerState.UNREGISTERED
        ],
        "bindings": [[n, intid] for n, intid in sorted(d.bindings.items())],
        "pending": sorted([[-1 if v is None else v, n] for v, n in d.pending]),
    }


def encode(d: Dispatcher) -> bytes:
    body = json.dumps(state_document(d), separators=(",", ":"), sort_keys=True).encode()
    # Level 1: snapshots are taken on the guest's critical path (once per conduit stop); level 6
    # costs six times the CPU for about 10% fewer bytes.
    packed = zlib.compress(body, 1)
    return HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_ZLIB, len(packed), zlib.crc32(packed)) + packed


# -- reading ---------------------------------------------------------------------------------------


def _read_document(blob: bytes) -> tuple[int, dict[str, Any]]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise IncompatibleState(f"state must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < HEADER.size:
        raise IncompatibleState(f"state is truncated: {len(blob)} bytes, the header alone is {HEADER.size}")
    magic, version, flags, length, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IncompatibleState("not a qmp-sdei state (bad magic)")
    if version not in _DECODERS:
        raise IncompatibleState(
            f"unknown state format version {version} (this build reads {', '.join(map(str, _DECODERS))})"
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
    try:
        if flags & FLAG_ZLIB:
            inflater = zlib.decompressobj()
            body = inflater.decompress(body, MAX_BODY)
            if inflater.unconsumed_tail:
                raise IncompatibleState(f"state body inflates beyond {MAX_BODY} bytes")
        doc = json.loads(body.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IncompatibleState(f"state is corrupted (undecodable body: {err})") from err
    if not isinstance(doc, dict):
        raise IncompatibleState("state is corrupted (body is not an object)")
    return version, doc


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


def _identity(doc: dict[str, Any], format_version: int = FORMAT_VERSION) -> SnapshotInfo:
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
    version, doc = _read_document(blob)
    return _identity(doc, version)


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

    _check_compatible(d, _identity(doc))
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


_DECODERS: dict[int, Callable[[Dispatcher, dict[str, Any]], Callable[[], None]]] = {1: _decode_v1}


def decode_into(d: Dispatcher, blob: bytes) -> None:
    version, doc = _read_document(blob)
    try:
        install = _DECODERS[version](d, doc)
    except IncompatibleState:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise IncompatibleState(f"state is corrupted: {err!r}") from err
    install()
